"""Perturbed-Attention Guidance (Ahn et al., ECCV 2024).

The perturbed prediction is the same model call with the attention map of the selected
self-attention layers replaced by the identity: every token keeps its own value, so the layer
output is ``to_out(to_v(x))``.  Guidance adds ``s * (cond - perturbed)`` to the CFG result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lib_attn.layers import LayerKey, select
from lib_attn.ops import active_at

Tensor = torch.Tensor


def adaptive_scale(scale: float, adaptive: float, timestep: float) -> float:
    """diffusers' ``pag_adaptive_scale``: ``max(0, scale - adaptive * (1000 - t))``."""
    if adaptive <= 0:
        return scale
    return max(0.0, scale - adaptive * (1000.0 - float(timestep)))


def pag_delta(cond: Tensor, perturbed: Tensor, scale: float) -> Tensor:
    """The PAG term ``s * (cond - perturbed)``; shapes (B, C, H, W)."""
    return (cond - perturbed) * scale


def cfg_pag(uncond: Tensor | None, cond: Tensor, perturbed: Tensor, cfg_scale: float, pag_scale: float) -> Tensor:
    """Reference combination ``uncond + cfg*(cond - uncond) + s*(cond - perturbed)``.

    Without an unconditional prediction (CFG 1, or no uncond), ``cond + s*(cond - perturbed)``.
    """
    base = cond if uncond is None else uncond + (cond - uncond) * cfg_scale
    return base + pag_delta(cond, perturbed, pag_scale)


@dataclass(frozen=True)
class PagPlan:
    """PAG for one sampling pass (hires override already applied)."""

    scale: float
    adaptive_scale: float
    start: float
    end: float
    layers: tuple[LayerKey, ...]

    @classmethod
    def build(cls, settings: Any, available: Sequence[LayerKey]) -> PagPlan | None:
        """None when PAG is off for this pass.  Raises LayerSelectorError for a bad selector."""
        if not settings.enabled or settings.scale <= 0:
            return None
        layers = tuple(select(settings.layers, available, attn="attn1"))
        return cls(settings.scale, settings.adaptive_scale, settings.start, settings.end, layers)

    def scale_at(self, step: int, total: int, timestep: float | None) -> float:
        """Effective scale at a step (0 outside the interval or once the adaptive scale hits 0)."""
        if not active_at(step, total, self.start, self.end):
            return 0.0
        if timestep is None or self.adaptive_scale <= 0:
            return self.scale
        return adaptive_scale(self.scale, self.adaptive_scale, timestep)


def identity_attention(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Self-attention of ``module`` (ldm/sgm CrossAttention) with an identity attention map.

    ``x``: (B, N, C) hidden states.  softmax(QK^T) = I gives ``out = V`` per head, so the result
    is ``to_out(to_v(x))``; Q and K are never computed.
    """
    return module.to_out(module.to_v(x))
