"""Smoothed Energy Guidance (Hong, NeurIPS 2024).

The perturbed prediction is the cond prediction with the queries of the chosen self-attention layers blurred over
the token grid by a 2-D Gaussian of std sigma (keys and values unchanged), which smooths the attention's energy
landscape.  As in the official SEG-SDXL code: the kernel is the odd size just above ``6 sigma``, capped at the grid
(the official code caps it at the width of a square grid; here at the shorter side, the same on square grids), with
reflected edges; a sigma above 9999 is the "infinite blur" limit, where every query becomes its spatial mean (the
attention map becomes uniform).  The guidance is PAG's: ``s * (cond - perturbed)`` after CFG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lib_attn.guided import PerturbedPlan
from lib_attn.layers import LayerKey
from lib_attn.ops import attention, gaussian_blur, grid_of

Tensor = torch.Tensor

INFINITE = 9999.0  # a blur sigma above this is the infinite-blur limit (the official threshold)


def kernel_size(sigma: float, h: int, w: int) -> int:
    """The official kernel size ``ceil(6 sigma) + 1``, made odd, capped at the shorter side of the grid (its largest
    odd size that reflected padding allows)."""
    k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    side = min(h, w)
    return min(k, side - (side % 2 - 1))


def blur_queries(q: Tensor, hw: tuple[int, int], sigma: float) -> Tensor:
    """Queries ``(B, N, C)`` of an ``h x w`` token grid, each channel blurred over the grid; sigma 0 leaves them."""
    if sigma <= 0:
        return q
    b, n, c = q.shape
    h, w = hw
    maps = q.transpose(1, 2).reshape(b, c, h, w)
    if sigma > INFINITE:
        out = maps.mean(dim=(-2, -1), keepdim=True).expand_as(maps)
    else:
        out = gaussian_blur(maps, sigma, size=kernel_size(sigma, h, w), mode="reflect")
    return out.reshape(b, c, n).transpose(1, 2)


def seg_attention(q: Tensor, k: Tensor, v: Tensor, n_heads: int, hw: tuple[int, int], sigma: float) -> Tensor:
    """Self-attention of projected ``(B, N, heads*d)`` tensors with blurred queries (before ``to_out``)."""
    return attention(blur_queries(q, hw, sigma), k, v, n_heads)


def token_grid(n: int, latent_hw: tuple[int, int], field: Any) -> tuple[int, int]:
    """The layer's (h, w) token grid; a layer whose tokens do not form one fails ``field``."""
    try:
        return grid_of(n, latent_hw)
    except ValueError as e:
        raise field.error(f"cannot blur the queries: {e} (an extension reshaping attention, Hypertile?)") from None


@dataclass(frozen=True)
class SegPlan(PerturbedPlan):
    """SEG for one sampling pass."""

    blur_sigma: float = INFINITE + 1

    @classmethod
    def build(cls, settings: Any, available: Sequence[LayerKey]) -> SegPlan | None:
        return super().build(settings, available, blur_sigma=settings.blur_sigma)
