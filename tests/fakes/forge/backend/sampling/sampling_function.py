"""``backend.sampling.sampling_function`` (Forge 2.x): CFG with model_options hooks and chunk batching.

Behaviour reproduced (written from Forge's documented behaviour, not copied):

* ``calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options) -> (cond_pred, uncond_pred)``
  builds one chunk of ``B`` rows per cond entry (one per ``AND`` position) and one for ``uncond`` (if not
  None), and batches as many compatible chunks as fit in free memory into one ``model.apply_model`` call,
  taking them from the **end** of the list (so with room for all: ``uncond`` rows first, then the cond
  chunks in reverse order).  Each call gets a copy of ``model_options['transformer_options']`` with
  ``cond_or_uncond`` (0/1 per chunk), ``sigmas`` (the B-row sigma), ``cond_mark``, ``cond_indices`` and
  ``uncond_indices``; chunk outputs are averaged with their ``strength``.  ``model_function_wrapper`` is
  honoured.  With nothing computed for uncond, ``uncond_pred`` is zeros.
* ``sampling_function_inner``: uncond dropped when ``cond_scale == 1`` unless
  ``disable_cfg1_optimization``; ``sampler_pre_cfg_function`` list, ``sampler_cfg_function`` (args dict,
  result used as ``x - fn(args)``), ``sampler_post_cfg_function`` list (args dict, result is the new denoised).
* ``sampling_function(self, denoiser_params, cond_scale, cond_composition)`` called by the CFG denoiser.
"""

from __future__ import annotations

import collections
import math

import torch
from backend import memory_management
from backend.sampling.condition import Condition, compile_conditions, compile_weighted_conditions

COND = 0
UNCOND = 1

_Chunk = collections.namedtuple("_Chunk", ["input_x", "mult", "conditioning", "area", "control", "patches"])


def get_area_and_mult(conds, x_in, timestep_in):
    if "timestep_start" in conds and timestep_in[0] > conds["timestep_start"]:
        return None
    if "timestep_end" in conds and timestep_in[0] < conds["timestep_end"]:
        return None
    if "area" in conds or "mask" in conds:
        raise NotImplementedError("area/mask conds are not part of the Forge double")
    area = (x_in.shape[2], x_in.shape[3], 0, 0)
    strength = conds.get("strength", 1.0)
    mult = torch.ones_like(x_in) * strength
    conditioning = {
        name: c.process_cond(batch_size=x_in.shape[0], device=x_in.device, area=area)
        for name, c in conds["model_conds"].items()
    }
    return _Chunk(x_in, mult, conditioning, area, conds.get("control"), None)


def cond_equal_size(c1, c2):
    if c1 is c2:
        return True
    if c1.keys() != c2.keys():
        return False
    return all(c1[k].can_concat(c2[k]) for k in c1)


def can_concat_cond(c1, c2):
    if c1.input_x.shape != c2.input_x.shape:
        return False
    if (c1.control is None) != (c2.control is None) or (c1.control is not None and c1.control is not c2.control):
        return False
    if (c1.patches is None) != (c2.patches is None) or (c1.patches is not None and c1.patches is not c2.patches):
        return False
    return cond_equal_size(c1.conditioning, c2.conditioning)


def cond_cat(c_list):
    grouped: dict = {}
    for c in c_list:
        for k, v in c.items():
            grouped.setdefault(k, []).append(v)
    return {k: v[0].concat(v[1:]) for k, v in grouped.items()}


def compute_cond_mark(cond_or_uncond, sigmas):
    rows = int(sigmas.shape[0])
    mark = [flag for flag in cond_or_uncond for _ in range(rows)]
    return torch.Tensor(mark).to(sigmas)


def compute_cond_indices(cond_or_uncond, sigmas):
    rows = int(sigmas.shape[0])
    cond_indices, uncond_indices = [], []
    for i, flag in enumerate(cond_or_uncond):
        (cond_indices if flag == COND else uncond_indices).extend(range(i * rows, (i + 1) * rows))
    return cond_indices, uncond_indices


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    out_cond = torch.zeros_like(x_in)
    out_count = torch.ones_like(x_in) * 1e-37
    out_uncond = torch.zeros_like(x_in)
    out_uncond_count = torch.ones_like(x_in) * 1e-37

    to_run = []
    for c in cond:
        chunk = get_area_and_mult(c, x_in, timestep)
        if chunk is not None:
            to_run.append((chunk, COND))
    for c in uncond if uncond is not None else []:
        chunk = get_area_and_mult(c, x_in, timestep)
        if chunk is not None:
            to_run.append((chunk, UNCOND))

    while to_run:
        first = to_run[0][0]
        compatible = [i for i in range(len(to_run)) if can_concat_cond(to_run[i][0], first)]
        compatible.reverse()
        to_batch = compatible[:1]
        free_memory = memory_management.get_free_memory(x_in.device)
        for divisor in range(1, len(compatible) + 1):
            amount = compatible[: len(compatible) // divisor]
            shape = [len(amount) * first.input_x.shape[0], *list(first.input_x.shape[1:])]
            if model.memory_required(shape) < free_memory:
                to_batch = amount
                break

        inputs, mults, conds, areas, cond_or_uncond = [], [], [], [], []
        control = None
        for index in to_batch:
            chunk, flag = to_run.pop(index)
            inputs.append(chunk.input_x)
            mults.append(chunk.mult)
            conds.append(chunk.conditioning)
            areas.append(chunk.area)
            cond_or_uncond.append(flag)
            control = chunk.control

        n_chunks = len(cond_or_uncond)
        input_x = torch.cat(inputs)
        c = cond_cat(conds)
        timestep_ = torch.cat([timestep] * n_chunks)

        transformer_options = dict(model_options.get("transformer_options", {}))
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["sigmas"] = timestep
        transformer_options["cond_mark"] = compute_cond_mark(cond_or_uncond, timestep)
        transformer_options["cond_indices"], transformer_options["uncond_indices"] = compute_cond_indices(
            cond_or_uncond, timestep
        )
        c["transformer_options"] = transformer_options
        if control is not None:
            raise NotImplementedError("ControlNet is not part of the Forge double")

        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](
                model.apply_model, {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond}
            )
        else:
            output = model.apply_model(input_x, timestep_, **c)
        output = output.chunk(n_chunks)

        for o in range(n_chunks):
            if cond_or_uncond[o] == COND:
                out_cond += output[o] * mults[o]
                out_count += mults[o]
            else:
                out_uncond += output[o] * mults[o]
                out_uncond_count += mults[o]

    return out_cond / out_count, out_uncond / out_uncond_count


def sampler_cfg_args(model, x, timestep, cond_pred, uncond_pred, cond_scale, model_options):
    """The ``sampler_cfg_function`` arguments (``"uncond"`` is None where there is no ``uncond_pred``: reForge)."""
    return {
        "cond": x - cond_pred,
        "uncond": None if uncond_pred is None else x - uncond_pred,
        "cond_scale": cond_scale,
        "timestep": timestep,
        "input": x,
        "sigma": timestep,
        "cond_denoised": cond_pred,
        "uncond_denoised": uncond_pred,
        "model": model,
        "model_options": model_options,
    }


def post_cfg_args(model, x, timestep, cond, uncond, cond_pred, uncond_pred, denoised, model_options):
    """A ``sampler_post_cfg_function``'s arguments."""
    return {
        "denoised": denoised,
        "cond": cond,
        "uncond": uncond,
        "model": model,
        "uncond_denoised": uncond_pred,
        "cond_denoised": cond_pred,
        "sigma": timestep,
        "model_options": model_options,
        "input": x,
    }


def sampling_function_inner(
    model,
    x,
    timestep,
    uncond,
    cond,
    cond_scale,
    model_options={},  # noqa: B006 - Forge's signature
    seed=None,
    return_full=False,
):
    edit_strength = sum(item.get("strength", 1) for item in cond)

    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond

    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)

    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)

    if "sampler_cfg_function" in model_options:
        args = sampler_cfg_args(model, x, timestep, cond_pred, uncond_pred, cond_scale, model_options)
        cfg_result = x - model_options["sampler_cfg_function"](args)
    elif not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale

    for fn in model_options.get("sampler_post_cfg_function", []):
        cfg_result = fn(
            post_cfg_args(model, x, timestep, cond, uncond, cond_pred, uncond_pred, cfg_result, model_options)
        )

    if return_full:
        return cfg_result, cond_pred, uncond_pred
    return cfg_result


INNER = None
"""The CFG step that ``sampling_function`` runs (default ``sampling_function_inner``); reForge's flavour of the double
puts its ``ldm_patched.modules.samplers.sampling_function`` here."""


def sampling_function(self, denoiser_params, cond_scale, cond_composition):
    unet_patcher = self.inner_model.inner_model.forge_objects.unet
    model = unet_patcher.model
    x = denoiser_params.x
    timestep = denoiser_params.sigma
    uncond = compile_conditions(denoiser_params.text_uncond)
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    model_options = unet_patcher.model_options
    seed = self.p.seeds[0]

    image_cond = unet_patcher.extra_concat_condition
    if image_cond is None:
        image_cond = denoiser_params.image_cond
    if (
        isinstance(image_cond, torch.Tensor)
        and image_cond.shape[0] == x.shape[0]
        and image_cond.shape[2:] == x.shape[2:]
    ):
        for entry in (uncond or []) + cond:
            entry["model_conds"]["c_concat"] = Condition(image_cond)

    for modifier in model_options.get("conditioning_modifiers", []):
        model, x, timestep, uncond, cond, cond_scale, model_options, seed = modifier(
            model, x, timestep, uncond, cond, cond_scale, model_options, seed
        )

    inner = INNER or sampling_function_inner
    return inner(model, x, timestep, uncond, cond, cond_scale, model_options, seed, return_full=True)


def sampling_prepare(unet, x):
    memory_management.load_models_gpu([unet, *unet.extra_model_patchers_during_sampling])


def sampling_cleanup(unet):
    unet.forge_unpatch_model()
