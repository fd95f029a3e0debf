"""Tensor operations shared by the methods, one of each: attention heads, scaled dot-product attention, AdaIN,
and the step schedule (where a step stands in its pass, and whether it lies in a method's interval)."""

from __future__ import annotations

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
