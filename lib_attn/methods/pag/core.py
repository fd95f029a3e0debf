"""Perturbed-Attention Guidance (Ahn et al., ECCV 2024).

The perturbed prediction is the same model call with the attention map of the selected
self-attention layers replaced by the identity: every token keeps its own value, so the layer
output is ``to_out(to_v(x))``.  Guidance adds ``s * (cond - perturbed)`` to the CFG result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lib_attn.guided import PerturbedPlan, guidance_delta
from lib_attn.layers import LayerKey

Tensor = torch.Tensor


def cfg_pag(uncond: Tensor | None, cond: Tensor, perturbed: Tensor, cfg_scale: float, pag_scale: float) -> Tensor:
    """Reference combination ``uncond + cfg*(cond - uncond) + s*(cond - perturbed)``.

    Without an unconditional prediction (CFG 1, or no uncond), ``cond + s*(cond - perturbed)``.
    """
    base = cond if uncond is None else uncond + (cond - uncond) * cfg_scale
    return base + guidance_delta(cond, perturbed, pag_scale)


class PagPlan(PerturbedPlan):
    """PAG for one sampling pass (hires override already applied)."""

    @classmethod
    def build(cls, settings: Any, available: Sequence[LayerKey]) -> PagPlan | None:
        return super().build(settings, available, adaptive_scale=settings.adaptive_scale)


def identity_attention(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Self-attention of ``module`` (ldm/sgm CrossAttention) with an identity attention map.

    ``x``: (B, N, C) hidden states.  softmax(QK^T) = I gives ``out = V`` per head, so the result
    is ``to_out(to_v(x))``; Q and K are never computed.
    """
    return module.to_out(module.to_v(x))
