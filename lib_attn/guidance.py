"""Pure guidance math: CFG + PAG combination and step/timestep schedules.

All functions are linear in the predictions, so they apply to eps predictions (DDIM/PLMS/UniPC
in A1111) and to denoised x0 predictions (k-diffusion) alike.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def step_fraction(step: int, total: int) -> float:
    """Position of sampling step ``step`` (0-based) among ``total`` steps, in [0, 1]."""
    if total <= 1:
        return 0.0
    return min(max(step / (total - 1), 0.0), 1.0)


def in_interval(fraction: float, start: float, end: float) -> bool:
    """True when ``start <= fraction <= end`` (a tiny tolerance absorbs float rounding)."""
    eps = 1e-6
    return start - eps <= fraction <= end + eps


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
