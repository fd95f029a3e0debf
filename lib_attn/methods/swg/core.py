"""SWG, sliding-window guidance (Kaiser, Adaloglou, Kollmann, 2024, arXiv:2411.10257).

The weak prediction is the model's cond prediction assembled from overlapping crops ("windows") of the latent, each
run on its own; the guidance is ``s * (cond - weak)`` after CFG.  Windows per axis: as few as keep at least
``overlap`` (at most half a window) between neighbours, spread evenly, the first and last at the edges (SD Steer's
layout, where the last window is snapped to the edge).  Where windows overlap their predictions are joined with a linear ramp across the
overlap (weights 1 at a window's inside and at the latent's border), not a plain mean, so no seam shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lib_attn.ops import active_at

Tensor = torch.Tensor


@dataclass(frozen=True)
class SwgPlan:
    scale: float
    window: int  # pixels; 0: three quarters of each side
    overlap: int  # pixels, the least overlap between neighbouring windows
    start: float
    end: float

    def scale_at(self, step: int, total: int) -> float:
        return self.scale if active_at(step, total, self.start, self.end) else 0.0


def auto_side(side: int) -> int:
    """Three quarters of a latent side, rounded down to a multiple of 8 latent pixels (64 pixels: the UNet halves
    the size three times, so such crops run as exactly as a whole image) where the side allows it."""
    q = side * 3 // 4
    return q - q % 8 if q >= 8 else max(1, q)


def plan_windows(plan: SwgPlan, h: int, w: int, field: object) -> list[tuple[slice, slice, Tensor]]:
    """The windows of an ``h x w`` latent; a window larger than the latent fails ``field`` (a Field)."""
    if plan.window == 0:
        return windows(h, w, auto_side(h), auto_side(w), plan.overlap // 8)
    side = plan.window // 8
    if side > h or side > w:
        raise field.error(  # type: ignore[attr-defined]
            f"a window of {plan.window} pixels is larger than the image ({w * 8}x{h * 8} pixels here); "
            "use a smaller one, or 0 for three quarters of each side"
        )
    return windows(h, w, side, side, plan.overlap // 8)


def starts(side: int, win: int, overlap: int) -> list[int]:
    """Window starts along one axis of ``side`` latent pixels (window ``win``, least overlap ``overlap``)."""
    if win >= side:
        return [0]
    stride = max(1, win - overlap, math.ceil(win / 2))  # the overlap is at most half a window
    n = math.ceil((side - win) / stride) + 1
    return [round(i * (side - win) / (n - 1)) for i in range(n)]


def _ramp(win: int, at: int, side: int, neighbours: list[int]) -> Tensor:
    """Weights along one axis of the window starting at ``at``: a linear ramp over the part shared with a neighbour,
    1 elsewhere (and at the latent's border)."""
    w = torch.ones(win, dtype=torch.float64)
    i = torch.arange(win, dtype=torch.float64)
    for other in neighbours:
        if other < at < other + win:  # shares its start with the previous window
            n = other + win - at
            w = torch.minimum(w, (i + 1) / (n + 1))
        if at < other < at + win:  # shares its end with the next one
            n = at + win - other
            w = torch.minimum(w, (win - i) / (n + 1))
    return w


def windows(h: int, w: int, win_h: int, win_w: int, overlap: int) -> list[tuple[slice, slice, Tensor]]:
    """``(rows, cols, weight)`` of every window of an ``h x w`` latent; the weights sum to a positive map."""
    ys, xs = starts(h, win_h, overlap), starts(w, win_w, overlap)
    out = []
    for y in ys:
        for x in xs:
            weight = _ramp(min(win_h, h), y, h, ys)[:, None] * _ramp(min(win_w, w), x, w, xs)[None, :]
            out.append((slice(y, y + min(win_h, h)), slice(x, x + min(win_w, w)), weight))
    return out


def join(preds: list[Tensor], wins: list[tuple[slice, slice, Tensor]], like: Tensor) -> Tensor:
    """The window predictions put together at their places, weighted (B, C, H, W) like ``like``."""
    total = torch.zeros_like(like)
    norm = torch.zeros(like.shape[-2:], dtype=like.dtype, device=like.device)
    for pred, (ys, xs, weight) in zip(preds, wins, strict=True):
        wt = weight.to(like)
        total[..., ys, xs] += pred * wt
        norm[ys, xs] += wt
    return total / norm
