"""Perturbed-Attention Guidance (Ahn et al., ECCV 2024).

The perturbed prediction is the same model call with the attention map of the selected
self-attention layers replaced by the identity: every token keeps its own value, so the layer
output is ``to_out(to_v(x))``.  Guidance adds ``s * (cond - perturbed)`` to the CFG result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lib_attn import guidance
from lib_attn.layers import LayerKey, select
from lib_attn.settings import PagSettings


@dataclass(frozen=True)
class PagPlan:
    """PAG for one sampling pass (hires override already applied)."""

    scale: float
    adaptive_scale: float
    start: float
    end: float
    layers: tuple[LayerKey, ...]

    @classmethod
    def build(cls, settings: PagSettings, available: Sequence[LayerKey]) -> PagPlan | None:
        """None when PAG is off for this pass.  Raises LayerSelectorError for a bad selector."""
        if not settings.enabled or settings.scale <= 0:
            return None
        layers = tuple(select(settings.layers, available, attn="attn1"))
        return cls(settings.scale, settings.adaptive_scale, settings.start, settings.end, layers)

    def scale_at(self, step: int, total: int, timestep: float | None) -> float:
        """Effective scale at a step (0 outside the interval or once the adaptive scale hits 0)."""
        if not guidance.in_interval(guidance.step_fraction(step, total), self.start, self.end):
            return 0.0
        if timestep is None or self.adaptive_scale <= 0:
            return self.scale
        return guidance.adaptive_scale(self.scale, self.adaptive_scale, timestep)


def identity_attention(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Self-attention of ``module`` (ldm/sgm CrossAttention) with an identity attention map.

    ``x``: (B, N, C) hidden states.  softmax(QK^T) = I gives ``out = V`` per head, so the result
    is ``to_out(to_v(x))``; Q and K are never computed.
    """
    return module.to_out(module.to_v(x))
