"""Attention-masked upscaling after YODA, "You Only Diffuse Areas" (Moser, Frolov et al., arXiv 2308.07977).

YODA diffuses only where an attention map of the low-resolution input points, and lets that
region grow over the sampling steps; the rest keeps the low-resolution content.  The paper's mask
is ``M_t = 1[A >= t/T]`` on a min-max normalized map ``A``.  No official code exists, so the
WebUI adaptation here is ours (img2img / hires pass over an upscaled image):

* **Map.**  ``A`` (DINO [CLS] attention of the input, see :mod:`lib_attn.methods.dino`, or a UNet
  map) is resized to the latent grid (:func:`resize_map`) and min-max normalized per image
  (:func:`normalize_map`).
* **Coverage schedule.**  With progress ``s = step / (total_steps - 1)`` in [0, 1] the mask covers the
  fraction ::

      coverage(s) = c0 + (1 - c0) * s ** gamma

  of the latent pixels: those whose score is among the top ``coverage(s)`` (:func:`mask_at`).  ``c0``
  ("start coverage") is the share diffused at the first step, ``gamma`` bends the growth (1 =
  linear, > 1 = slow start, < 1 = fast start), and the last step covers everything.  This is the
  paper's rule with the score cut replaced by a rank (quantile) cut: ``1[A >= t/T]`` covers
  whatever share of the map lies above ``t/T``, which depends on the map's histogram; the quantile
  cut makes ``c0`` and ``gamma`` mean the same on every image.  Ties at the cut are all taken, so a
  map with plateaus can be covered a little more than ``coverage(s)``; a constant map (no
  information) is covered entirely from the first step, i.e. plain img2img.
* **Threshold.**  Optionally, pixels whose normalized score is ``>= threshold`` are in the mask from
  the first step on, whatever the coverage: an absolute floor for salient areas larger than ``c0``.
  ``None`` turns it off.
* **Feather.**  :func:`feather` softens the binary mask with a Gaussian at latent resolution and
  keeps the binary mask's pixels at exactly 1, so the soft edge grows outward.
* **Blend.**  After each step ``x <- lowres_noised + m * (x - lowres_noised)`` (:func:`blend`), where
  ``lowres_noised`` is the upscaled low-resolution latent noised to the current level, as in
  inpainting-mask blending.  A pixel that joins the mask enters at the right noise level.

Monotonicity: the masks of a pass are nested (a pixel once in stays in).  ``coverage(s)`` does not
decrease with the step, so the quantile cut value does not increase and ``{A >= cut}`` only grows;
the threshold set is fixed.  :func:`feather` is order preserving (a sum of non-negative weights
times shifted copies, evaluated term by term in a fixed order, then ``max`` with the mask), so a
nested binary sequence stays nested after feathering, exactly in floating point.

All functions are pure torch; maps are ``(B, h, w)`` or ``(B, 1, h, w)``, masks ``(B, 1, h, w)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib_attn.ops import blend, gaussian_blur, progress  # noqa: F401  (blend: used through this module)

Tensor = torch.Tensor

SOURCES = ("dino", "unet")


@dataclass(frozen=True)
class YodaPlan:
    """YODA settings for one sampling pass.

    ``start_coverage``: share of latent pixels diffused at the first step, in [0, 1].
    ``gamma``: growth exponent of the coverage (> 0; 1 = linear).
    ``threshold``: normalized score from which a pixel is diffused from the first step (None = off).
    ``blur``: Gaussian sigma of the feather in latent pixels (0 = hard mask).
    ``source``: where the attention map comes from, "dino" (the paper) or "unet".
    """

    start_coverage: float = 0.25
    gamma: float = 1.0
    threshold: float | None = None
    blur: float = 0.0
    source: str = "dino"
    layers: tuple = ()  # the UNet self-attention layers of the "unet" source (LayerKeys)

    def __post_init__(self) -> None:
        if not 0.0 <= self.start_coverage <= 1.0:
            raise ValueError(f"YODA start coverage must be in [0, 1], got {self.start_coverage}")
        if not self.gamma > 0.0 or not math.isfinite(self.gamma):
            raise ValueError(f"YODA gamma must be a positive number, got {self.gamma}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"YODA threshold must be in [0, 1] or None, got {self.threshold}")
        if not self.blur >= 0.0 or not math.isfinite(self.blur):
            raise ValueError(f"YODA blur must be >= 0, got {self.blur}")
        if self.source not in SOURCES:
            raise ValueError(f"YODA source must be one of {SOURCES}, got {self.source!r}")

    def coverage_at(self, step: int, total_steps: int) -> float:
        """Target covered share at a step: :func:`coverage_threshold` of :func:`progress`."""
        return coverage_threshold(progress(step, total_steps, single=1.0), self.start_coverage, self.gamma)

    def mask_at(self, attn_map: Tensor, step: int, total_steps: int) -> Tensor:
        """The mask to blend with at a step: :func:`mask_at` feathered by ``blur``; (B, 1, h, w) in [0, 1]."""
        return feather(mask_at(attn_map, step, total_steps, self), self.blur)


def coverage_threshold(progress: float, start_coverage: float, gamma: float) -> float:
    """Share of pixels in the mask at ``progress`` s: ``c0 + (1 - c0) * s**gamma``.

    Non-decreasing in s (gamma > 0), ``c0`` at s = 0 and exactly 1 at s = 1.
    """
    s = min(max(float(progress), 0.0), 1.0)
    if s >= 1.0:
        return 1.0
    return min(1.0, start_coverage + (1.0 - start_coverage) * s**gamma)


def _as_4d(a: Tensor) -> Tensor:
    if a.dim() == 3:
        return a.unsqueeze(1)
    if a.dim() == 4 and a.shape[1] == 1:
        return a
    raise ValueError(f"attention map must be (B, h, w) or (B, 1, h, w), got {tuple(a.shape)}")


def normalize_map(a: Tensor) -> Tensor:
    """Per-image min-max normalization to [0, 1], same shape as ``a`` ((B, ...)).

    A constant image (max - min below 1e-12 relative to its magnitude) maps to all ones: without
    contrast every pixel is equally salient, so nothing is held back.
    """
    flat = a.reshape(a.shape[0], -1).float()
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    span = hi - lo
    flat_ok = span > 1e-12 * torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)
    out = torch.where(flat_ok, (flat - lo) / torch.where(flat_ok, span, torch.ones_like(span)), torch.ones_like(flat))
    return out.clamp_(0.0, 1.0).reshape(a.shape).to(a.dtype if a.is_floating_point() else torch.float32)


def resize_map(attn: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of a map to ``size`` = (h, w) (the latent grid): (B, 1, h, w).

    Antialiased, so shrinking a fine map averages it rather than sampling it; values stay within
    the input's range (non-negative interpolation weights).
    """
    a = _as_4d(attn).float()
    h, w = int(size[0]), int(size[1])
    if a.shape[-2:] == (h, w):
        return a.clone()
    return F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False, antialias=True)


def mask_at(attn_map: Tensor, step: int, total_steps: int, schedule: YodaPlan) -> Tensor:
    """Binary mask (B, 1, h, w), float in {0, 1}, of the pixels diffused at ``step`` (0-based).

    ``attn_map`` is normalized per image here (:func:`normalize_map`).  A pixel is in when its score
    is ``>=`` the score of rank ``k = floor(coverage * h * w + 0.5)`` (ties all in; k = 0: none), or
    when it is ``>= schedule.threshold``.  The last step gives all ones.
    """
    a = normalize_map(_as_4d(attn_map).float())
    b = a.shape[0]
    n = a.shape[-2] * a.shape[-1]
    cov = schedule.coverage_at(step, total_steps)
    if cov >= 1.0:
        return torch.ones_like(a)
    k = min(n, math.floor(cov * n + 0.5))
    flat = a.reshape(b, n)
    if k > 0:
        cut = torch.topk(flat, k, dim=1).values[:, k - 1 : k]
        inside = flat >= cut
    else:
        inside = torch.zeros_like(flat, dtype=torch.bool)
    if schedule.threshold is not None:
        inside |= flat >= schedule.threshold
    return inside.to(a.dtype).reshape(a.shape)


def self_attention_saliency(q: Tensor, k: Tensor, n_heads: int) -> Tensor:
    """Saliency of each token from one self-attention layer (the "unet" source, our adaptation: YODA's
    maps are DINO's): how concentrated its attention is, ``1 - H(p_i) / log N`` with ``p_i`` the
    softmax row of query i over the N keys, averaged over the heads; (rows, N) in [0, 1], float32.

    A token of a large uniform region spreads its attention over that region (high entropy, low
    score); a token of a small distinct structure attends to few tokens (low entropy, high score).
    ``q``, ``k``: the layer's projected queries and keys (rows, N, C).  Heads run one at a time, so
    the largest temporary is one (rows, N, N) map.
    """
    rows, n, c = q.shape
    d = c // n_heads
    if n < 2:
        return torch.ones(rows, n, dtype=torch.float32, device=q.device)
    qh = q.float().reshape(rows, n, n_heads, d)
    kh = k.float().reshape(rows, k.shape[1], n_heads, d)
    total = torch.zeros(rows, n, dtype=torch.float32, device=q.device)
    for h in range(n_heads):
        logits = qh[:, :, h] @ kh[:, :, h].transpose(-1, -2) * d**-0.5
        logp = torch.log_softmax(logits, dim=-1)
        total += -(logp.exp() * logp).sum(dim=-1)
    entropy = total / n_heads
    return (1.0 - entropy / math.log(k.shape[1])).clamp_(0.0, 1.0)


def feather(mask: Tensor, blur_px: float) -> Tensor:
    """Gaussian feather of a mask (B, 1, h, w) with sigma ``blur_px`` latent pixels; 0 = unchanged.

    ``max(blur(mask), mask)``: pixels of the mask stay exactly 1, the edge fades outward.  The blur
    is separable, replicate-padded and summed term by term with non-negative weights, so it preserves
    order (m1 <= m2 gives feather(m1) <= feather(m2)) and an all-ones mask stays all ones.  The
    result is clamped to [0, 1].
    """
    m = _as_4d(mask).float()
    if blur_px <= 0:
        return m.clone()
    return torch.maximum(gaussian_blur(m, float(blur_px)), m).clamp_(0.0, 1.0)
