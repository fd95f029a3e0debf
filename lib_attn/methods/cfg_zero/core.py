"""CFG-Zero* (Fan et al., 2025, arXiv:2503.18886): the optimized scale and zero-init, on x0 predictions, pure tensors.

The paper's rule is on the model's velocity (noise) predictions: ``s* = <v_c, v_u> / |v_u|^2`` per sample, then
``v = s* v_u + w (v_c - s* v_u)``, and ``v = 0`` in the first steps.  For any x0 prediction ``d`` of a model input
``x`` (k-diffusion units), ``x - d = sigma * eps`` (``sigma * v`` for flow models), so the same rule on x0 predictions
is exact: with ``a = x - u`` and ``b = x - c``, ``s* = <b, a> / |a|^2`` (sigma cancels), the uncond prediction becomes
``x - s* a``, and plain CFG on it gives the paper's result; zero-init is ``d = x`` (no change of the latent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class CfgZeroPlan:
    zero_steps: int
    zero_fraction: float
    start: float
    end: float

    def zeroed(self, call: int, total: int) -> bool:
        """Whether model evaluation ``call`` of the pass falls in zero-init."""
        return call < max(self.zero_steps, math.ceil(self.zero_fraction * total))


def optimized_scale(x: Tensor, c: Tensor, u: Tensor, eps: float = 1e-8) -> Tensor:
    """``s*`` per image (shape ``(B, 1, 1, 1)``), computed in float32 or wider."""
    a, b = (x - u).flatten(1), (x - c).flatten(1)
    wide = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(wide), b.to(wide)
    s = (a * b).sum(1) / ((a * a).sum(1) + eps)
    return s.view(-1, *(1,) * (x.dim() - 1)).to(x.dtype)


def scaled_uncond(x: Tensor, c: Tensor, u: Tensor) -> Tensor:
    """The uncond x0 prediction whose noise is ``s*`` times the original's."""
    return x - optimized_scale(x, c, u) * (x - u)
