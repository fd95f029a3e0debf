"""Forge Classic's ``ldm_patched.modules.samplers`` (classic 1f95d717): the same CFG step as Forge 2's
``sampling_function_inner`` (pre-CFG functions before the model call, ``(model, cond, uncond, x, timestep,
model_options)`` in and out) and ``calc_cond_uncond_batch``; no ``calc_cond_batch``."""

from __future__ import annotations

from backend.sampling.sampling_function import calc_cond_uncond_batch, sampling_function_inner

__all__ = ["calc_cond_uncond_batch", "sampling_function"]

sampling_function = sampling_function_inner
