"""reForge's ``ldm_patched.modules.samplers`` (main 3b56b268), where it differs from Forge 2's sampling function.

Behaviour reproduced (read from reForge's source, written for the double):

* ``calc_cond_batch(model, conds, x_in, timestep, model_options) -> [cond_pred, uncond_pred]`` for
  ``conds = [cond, uncond]`` (``uncond`` None gives a zero ``uncond_pred``); ``calc_cond_uncond_batch`` is its
  tuple form.  The chunk batching is the Forge double's.
* ``sampling_function``: at ``cond_scale == 1`` (unless ``disable_cfg1_optimization``) ``uncond_ = None``; the model
  call goes through ``model_options["sampler_calc_cond_batch_function"](args)`` when set (``args``: ``conds``,
  ``input``, ``sigma``, ``model``, ``model_options``), else ``calc_cond_batch``; **then** each
  ``sampler_pre_cfg_function`` gets ``args`` (``conds``, ``conds_out``, ``cond_scale``, ``timestep``, ``input``,
  ``sigma``, ``model``, ``model_options``) and returns the new ``conds_out``.
* ``cfg_function``: ``sampler_cfg_function(args)`` (``"uncond"`` None when there is no ``uncond_pred``) used as
  ``x - result``; each post-CFG function gets ``denoised``, ``cond``, ``uncond`` (= ``uncond_``: None at CFG 1),
  ``cond_scale``, ``model``, ``uncond_denoised``, ``cond_denoised``, ``sigma``, ``model_options``, ``input``.
"""

from __future__ import annotations

import math

from backend.sampling.sampling_function import calc_cond_uncond_batch as _batched
from backend.sampling.sampling_function import post_cfg_args, sampler_cfg_args


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    cond_pred, uncond_pred = _batched(model, conds[0], conds[1], x_in, timestep, model_options)
    return [cond_pred, uncond_pred]


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    return tuple(calc_cond_batch(model, [cond, uncond], x_in, timestep, model_options))


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options, cond=None, uncond=None):
    strength = sum(item.get("strength", 1) for item in cond)
    if "sampler_cfg_function" in model_options:
        args = sampler_cfg_args(model, x, timestep, cond_pred, uncond_pred, cond_scale, model_options)
        result = x - model_options["sampler_cfg_function"](args)
    elif uncond_pred is None:
        result = cond_pred
    else:
        scale = cond_scale if math.isclose(strength, 1.0) else cond_scale * strength
        result = uncond_pred + (cond_pred - uncond_pred) * scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = post_cfg_args(model, x, timestep, cond, uncond, cond_pred, uncond_pred, result, model_options)
        result = fn({**args, "cond_scale": cond_scale})
    return result


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None, return_full=False):  # noqa: B006
    """``return_full`` is the double's (its CFG denoiser reads the predictions)."""
    cfg1 = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
    uncond_ = None if cfg1 else uncond
    conds = [cond, uncond_]
    if "sampler_calc_cond_batch_function" in model_options:
        args = {"conds": conds, "input": x, "sigma": timestep, "model": model, "model_options": model_options}
        out = model_options["sampler_calc_cond_batch_function"](args)
    else:
        out = calc_cond_batch(model, conds, x, timestep, model_options)
    for fn in model_options.get("sampler_pre_cfg_function", []):
        args = {
            "conds": conds,
            "conds_out": out,
            "cond_scale": cond_scale,
            "timestep": timestep,
            "input": x,
            "sigma": timestep,
            "model": model,
            "model_options": model_options,
        }
        out = fn(args)
        x = args["input"]
    result = cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options, cond=cond, uncond=uncond_)
    return (result, out[0], out[1]) if return_full else result
