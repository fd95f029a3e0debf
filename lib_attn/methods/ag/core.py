"""AG, adaptive guidance (Castillo et al., AAAI 2025, arXiv:2312.12487): once the cond and uncond predictions agree
(cosine similarity at or above a threshold for every image), the later steps of the pass skip the uncond pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class AgPlan:
    threshold: float
    earliest: float  # the fraction of the pass before which CFG is always kept
    compare: str  # "denoised": cos(c, u); "noise": cos(x - c, x - u), the paper's


def similarity(x: Tensor, c: Tensor, u: Tensor, compare: str) -> Tensor:
    """Cosine similarity per image (float64) of the two predictions (``compare``: "denoised" or "noise")."""
    if compare == "noise":
        c, u = x - c, x - u
    return torch.nn.functional.cosine_similarity(c.flatten(1).double(), u.flatten(1).double(), dim=1)
