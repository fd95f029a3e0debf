"""APG, Adaptive Projected Guidance (Sadat, Hilliges, Weber, ICLR 2025): the rule on x0 predictions, pure tensors.

``d = c - u``; with momentum ``beta`` the running ``d <- d + beta * d_prev``; the norm of ``d`` (per image) is capped at
``r``; ``d`` is split into the part parallel to ``c`` and the part orthogonal to it (in float64); the result is
``c + (w - 1) * (d_orth + eta * d_par)`` (the paper's Algorithm 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class ApgPlan:
    eta: float
    norm_threshold: float
    momentum: float
    start: float
    end: float


def project(d: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``(parallel, orthogonal)`` parts of ``d`` against ``c``, per image, computed in float64."""
    dims = list(range(1, d.dim()))
    d64, c64 = d.double(), torch.nn.functional.normalize(c.double(), dim=dims)
    par = (d64 * c64).sum(dim=dims, keepdim=True) * c64
    return par.to(d.dtype), (d64 - par).to(d.dtype)


def cap_norm(d: Tensor, r: float) -> Tensor:
    """``d * min(1, r / |d|)`` per image (``r`` 0: unchanged)."""
    if r <= 0:
        return d
    norm = d.flatten(1).norm(p=2, dim=1).view(-1, *(1,) * (d.dim() - 1))
    return d * torch.clamp(r / norm, max=1.0)


def apg(c: Tensor, u: Tensor, w: float, plan: ApgPlan, running: Tensor | None) -> tuple[Tensor, Tensor]:
    """The guided prediction and the new running difference (the momentum state)."""
    d = c - u
    if plan.momentum != 0 and running is not None:
        d = d + plan.momentum * running
    running = d
    par, orth = project(cap_norm(d, plan.norm_threshold), c)
    return c + (orth + par * plan.eta) * (w - 1), running
