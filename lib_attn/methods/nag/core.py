"""Normalized Attention Guidance (Chen, Bandyopadhyay, Zou, Song, 2025).

In every cross-attention layer, on the rows conditioned on the prompt, the attention output for the prompt (``z+``)
and for the negative prompt (``z-``, the same queries on the negative prompt's keys and values) are extrapolated,
``z~ = z+ + (s - 1) (z+ - z-)`` (the official ``s z+ - (s - 1) z-``); where a token's ``|z~|_1 / |z+|_1`` exceeds
tau, ``z~`` is scaled down to that ratio; the layer goes on (``to_out``) with ``alpha z~ + (1 - alpha) z+``.  This
gives a negative prompt where CFG is off.  L1 norms per token as in the paper and ComfyUI-NAG (the official Flux
code uses L2 norms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lib_attn.layers import LayerKey
from lib_attn.ops import active_at, attention

Tensor = torch.Tensor

EPS = 1e-6  # the norms' lower clamp (ComfyUI-NAG)


def nag(z_pos: Tensor, z_neg: Tensor, scale: float, tau: float, alpha: float) -> Tensor:
    """The NAG output of attention outputs ``(B, N, C)`` for the prompt and the negative prompt."""
    guided = z_pos * scale - z_neg * (scale - 1)
    norm_pos = z_pos.norm(p=1, dim=-1, keepdim=True).clamp_min(EPS)
    norm_guided = guided.norm(p=1, dim=-1, keepdim=True).clamp_min(EPS)
    ratio = norm_guided / norm_pos
    guided = guided * (torch.minimum(ratio, ratio.new_tensor(tau)) / ratio)
    return guided * alpha + z_pos * (1 - alpha)


def nag_attention(q: Tensor, k: Tensor, v: Tensor, k_neg: Tensor, v_neg: Tensor, n_heads: int, plan: Any) -> Tensor:
    """Cross-attention output (before ``to_out``) of projected queries with NAG against the negative's keys/values."""
    return nag(attention(q, k, v, n_heads), attention(q, k_neg, v_neg, n_heads), plan.scale, plan.tau, plan.alpha)


@dataclass(frozen=True)
class NagPlan:
    """NAG for one sampling pass: every cross-attention layer."""

    scale: float
    tau: float
    alpha: float
    start: float
    end: float
    layers: tuple[LayerKey, ...]

    @classmethod
    def build(cls, settings: Any, available: Sequence[LayerKey], field: Any) -> NagPlan | None:
        if not settings.enabled or settings.scale <= 1:
            return None
        layers = tuple(k for k in available if k.attn == "attn2")
        if not layers:
            raise field.error("NAG needs the model's cross-attention layers; this model has none")
        return cls(settings.scale, settings.tau, settings.alpha, settings.start, settings.end, layers)

    def active_at(self, step: int, total: int) -> bool:
        return active_at(step, total, self.start, self.end)
