"""Tensor operations shared by the methods, one of each: attention heads, scaled dot-product attention, AdaIN,
and the step schedule (where a step stands in its pass, and whether it lies in a method's interval)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def heads(t: Tensor, h: int) -> Tensor:
    """(B, N, C) -> (B, h, N, C/h)."""
    b, n, c = t.shape
    return t.view(b, n, h, c // h).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """(B, h, N, d) -> (B, N, h*d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Scaled dot-product attention of split heads ``(B, h, N, d)`` with an explicit logit scale."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention(q: Tensor, k: Tensor, v: Tensor, n_heads: int, q_scale: float = 1.0) -> Tensor:
    """Multi-head attention of projected ``(B, N, heads*d)`` tensors (before ``to_out``), logits scaled by
    ``q_scale / sqrt(d)``."""
    d = q.shape[-1] // n_heads
    out = sdpa(heads(q, n_heads) * q_scale, heads(k, n_heads), heads(v, n_heads), d**-0.5)
    return merge_heads(out)


def adain(x: Tensor, ref: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-channel mean/std of ``x`` (B, C, H, W) matched to ``ref`` (1 or B, C, H, W), per image."""
    dims = (2, 3)
    mx, sx = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    mr, sr = ref.mean(dims, keepdim=True), ref.std(dims, keepdim=True)
    return (x - mx) / (sx + eps) * sr + mr


def progress(step: int, total: int, *, single: float = 0.0) -> float:
    """Where sampling step ``step`` (0-based) stands among ``total`` steps: ``step / (total - 1)`` in [0, 1], so the
    first step is 0 and the last is exactly 1.  A pass of one step is at ``single``: 0 for a method's interval (the
    step counts as the first), 1 for a schedule that must end complete (masked upscaling)."""
    if total <= 1:
        return single
    return min(max(step / (total - 1), 0.0), 1.0)


def in_interval(fraction: float, start: float, end: float) -> bool:
    """True when ``start <= fraction <= end`` (a tiny tolerance absorbs float rounding)."""
    eps = 1e-6
    return start - eps <= fraction <= end + eps


def active_at(step: int, total: int, start: float, end: float) -> bool:
    """Whether step ``step`` of ``total`` lies in the interval ``[start, end]`` (fractions of the pass)."""
    return in_interval(progress(step, total), start, end)


def grid_of(n: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of an attention layer with ``n`` queries in a UNet whose input latent is ``latent_hw``
    (each level halves the size, rounding up as the UNet's strided convolutions do)."""
    h, w = latent_hw
    for _ in range(8):
        if h * w == n:
            return h, w
        h, w = (h + 1) // 2, (w + 1) // 2
    raise ValueError(f"{n} queries do not match a level of a {latent_hw[0]}x{latent_hw[1]} latent")


def blend(x: Tensor, source: Tensor, mask: Tensor) -> Tensor:
    """``source + mask * (x - source)``: the source outside the mask, ``x`` inside, exact at both ends.

    ``x``, ``source``: (B, C, H, W); ``mask``: (B or 1, 1, H, W) in [0, 1].  Computed with :func:`torch.lerp`, which
    returns ``source`` exactly where mask = 0 and ``x`` exactly where mask = 1 (the plain formula can round there).
    """
    return torch.lerp(source, x, mask.to(x.dtype).expand_as(x))


def gaussian_blur(m: Tensor, sigma: float, size: int | None = None, mode: str = "replicate") -> Tensor:
    """Separable Gaussian blur of ``(..., H, W)``, the edges padded by ``mode`` (``replicate`` or ``reflect``);
    ``size`` (odd) defaults to ``2 * ceil(3 sigma) + 1``.  The weights are non-negative and sum to one, so a constant
    map stays constant and order is kept."""
    if sigma <= 0:
        return m
    size = size or max(3, 2 * math.ceil(3 * sigma) + 1)
    r = size // 2
    t = torch.arange(size, dtype=torch.float32, device=m.device) - r
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).to(m.dtype)
    shape = m.shape
    x = m.reshape(-1, 1, *shape[-2:])
    x = F.pad(x, (r, r, 0, 0), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode=mode)
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x.reshape(shape)


def sd_sigmas() -> torch.Tensor:
    """k-diffusion sigma of each of SD's 1000 training timesteps (scaled-linear betas 0.00085-0.012, float64),
    shared by SD1.x, SD2.x and SDXL."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0)
    return ((1 - a) / a).sqrt()
