"""TPG, Token Perturbation Guidance (Rajabi, Mehraban, Sadat, Taati, NeurIPS 2025, arXiv:2506.10036).

The perturbed prediction is the cond prediction with the tokens (the spatial positions) of the hidden states shuffled
at the input of the chosen transformer blocks; the guidance is PAG's, ``s * (cond - perturbed)`` after CFG.  The
permutation is drawn per step from the image seed, one for all images of the batch (as sd-perturbed-attention and
SD Steer draw one per call for the batch), so that a run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lib_attn.guided import PerturbedPlan

Tensor = torch.Tensor


@dataclass(frozen=True)
class TpgPlan(PerturbedPlan):
    """PAG's plan; ``layers`` are the self-attention layers of the chosen transformer blocks."""


def seed_of(p: object) -> int:
    """The generation's first image seed."""
    seeds = getattr(p, "all_seeds", None)
    return int(seeds[0]) if seeds else int(getattr(p, "seed", 0) or 0)


def permutation(seed: int, call: int, n: int) -> Tensor:
    """The token order of model evaluation ``call`` for ``n`` tokens (CPU generator seeded from both)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(call) * 7919 + n) % (2**63))
    return torch.randperm(n, generator=g)


def shuffle_tokens(x: Tensor, perm: Tensor) -> Tensor:
    """``x`` (B, N, C) with its tokens in the order ``perm``."""
    return x[:, perm.to(x.device)]


def block_path(attn1_path: str) -> str:
    """The transformer block of a self-attention module path (``….transformer_blocks.i.attn1`` -> ``….i``)."""
    return attn1_path.rsplit(".", 1)[0]
