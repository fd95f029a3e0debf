"""FDG, frequency-decoupled guidance (Sadat et al., 2025, arXiv:2506.19713): Laplacian pyramid bands of the cond and
uncond x0 predictions, each band guided with its own scale, then put back together; pure tensors.

The pyramid follows the paper's code (kornia's ``pyrdown``/``pyrup``: a 5x5 binomial blur with reflected borders,
bilinear resampling), except that each up-sampling goes to the exact size of the level above instead of padding the
latent to a power of two, so that any latent size splits and rebuilds exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


@dataclass(frozen=True)
class FdgPlan:
    levels: int
    low_share: float
    overrides: tuple[float | None, ...]  # per band (finest first), None: the default scale
    start: float
    end: float

    def scales(self, w: float) -> list[float]:
        """Each band's scale, finest first: from ``w`` down to ``max(1, w * low_share)`` linearly, then overrides."""
        low = max(1.0, w * self.low_share)
        n = self.levels
        out = [w + (low - w) * i / (n - 1) for i in range(n - 1)] + [low]
        return [o if o is not None else s for s, o in zip(out, self.overrides + (None,) * n, strict=False)]


def parse_scales(text: str, levels: int) -> tuple[float | None, ...]:
    """``"12, , 4"``: per-band scales, finest first; an empty entry keeps that band's default.  Raises ValueError."""
    if not text.strip():
        return ()
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > levels:
        raise ValueError(f"{len(parts)} scales for {levels} bands")
    out: list[float | None] = []
    for p in parts:
        if not p:
            out.append(None)
            continue
        value = float(p)
        if not 0 <= value <= 30:
            raise ValueError(f"band scale {value:g} is out of range [0, 30]")
        out.append(value)
    return tuple(out)


def _blur(x: Tensor) -> Tensor:
    k1 = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device) / 16
    k = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=x.shape[1])


def down(x: Tensor) -> Tensor:
    """Blur, then halve (floor) with bilinear resampling (kornia's ``pyrdown``)."""
    h, w = x.shape[-2:]
    return F.interpolate(_blur(x), size=(h // 2, w // 2), mode="bilinear", align_corners=False)


def up(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resampling to ``size``, then blur (kornia's ``pyrup`` where ``size`` is twice the input's)."""
    return _blur(F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False))


def min_side(levels: int) -> int:
    """The smallest latent side a pyramid of ``levels`` bands fits (the coarsest level needs 3 for the blur)."""
    return 3 * 2 ** (levels - 1)


def pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """Laplacian bands, finest first; the last is the coarsest Gaussian level.  ``sum`` back with :func:`rebuild`."""
    gauss = [x]
    for _ in range(levels - 1):
        gauss.append(down(gauss[-1]))
    bands = [g - up(gauss[i + 1], g.shape[-2:]) for i, g in enumerate(gauss[:-1])]
    return [*bands, gauss[-1]]


def rebuild(bands: Sequence[Tensor]) -> Tensor:
    out = bands[-1]
    for band in reversed(bands[:-1]):
        out = band + up(out, band.shape[-2:])
    return out


def fdg(
    c: Tensor, u: Tensor, scales: Sequence[float], combine: Callable[[Tensor, Tensor, float, tuple], Tensor]
) -> Tensor:
    """Each band ``i`` of ``c`` and ``u`` combined with ``combine(c_i, u_i, scales[i], (i,))``, then rebuilt."""
    pc, pu = pyramid(c, len(scales)), pyramid(u, len(scales))
    return rebuild([combine(a, b, s, (i,)) for i, (a, b, s) in enumerate(zip(pc, pu, scales, strict=True))])
