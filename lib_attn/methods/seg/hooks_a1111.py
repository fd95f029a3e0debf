"""SEG on A1111: its own B perturbed rows in the step's call (:class:`lib_attn.guided.PerturbedRows`); on the
chosen self-attention layers those rows attend with blurred queries."""

from __future__ import annotations

from typing import Any

import torch

from lib_attn.guided import PerturbedRows
from lib_attn.methods.seg import METHOD
from lib_attn.methods.seg.core import seg_attention, token_grid


class Hooks(PerturbedRows):
    NAME = "seg"

    def perturb(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        hw = token_grid(int(x.shape[1]), self.ctx.latent_hw, METHOD.field("layers"))
        q, k, v = module.to_q(x), module.to_k(x), module.to_v(x)
        return module.to_out(seg_attention(q, k, v, module.heads, hw, self.ctx.plan.seg.blur_sigma))
