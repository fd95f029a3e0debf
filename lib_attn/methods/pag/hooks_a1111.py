"""PAG on A1111: B perturbed rows (copies of each image's first cond row) between the cond and the uncond rows ride
in the same model call; on the chosen self-attention layers those rows take the identity attention map; after CFG
``s * (cond - perturbed)`` is added (:class:`lib_attn.guided.PerturbedRows`)."""

from __future__ import annotations

from typing import Any

import torch

from lib_attn.guided import PerturbedRows
from lib_attn.methods.pag.core import identity_attention


class Hooks(PerturbedRows):
    NAME = "pag"

    def perturb(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        return identity_attention(module, x)
