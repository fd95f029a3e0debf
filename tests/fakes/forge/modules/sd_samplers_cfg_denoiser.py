"""``modules.sd_samplers_cfg_denoiser.CFGDenoiser`` as in Forge 2.x.

Per call (one k-diffusion model evaluation): interrupt check; conds resolved for ``self.step``
(``uncond`` may be None); img2img mask blend **before** the model (``x*nmask + noise_scaling(sigma,
randn_like(init_latent), init_latent)*mask``); ``on_cfg_denoiser`` with the **un-batched** ``x``/``sigma``/
``image_cond`` (B rows); hires pass uses ``p.hr_cfg``; ``skip_early_cond`` / NGMS set ``cond_scale = 1``;
``backend.sampling.sampling_function``; mask blend **after** (+ ``on_mask_blend``); ``on_cfg_after_cfg``;
``step += 1``.  ``on_cfg_denoised`` is never called.
"""

from __future__ import annotations

import torch
from backend.sampling.sampling_function import sampling_function
from modules import prompt_parser, sd_samplers_common, shared
from modules.script_callbacks import (
    AfterCFGCallbackParams,
    CFGDenoisedParams,  # noqa: F401 - imported, never used, as in Forge
    CFGDenoiserParams,
    cfg_after_cfg_callback,
    cfg_denoised_callback,  # noqa: F401
    cfg_denoiser_callback,
)
from modules.shared import state


def catenate_conds(conds):
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([x[key] for x in conds]) for key in conds[0]}


def subscript_cond(cond, a, b):
    if not isinstance(cond, dict):
        return cond[a:b]
    return {key: vec[a:b] for key, vec in cond.items()}


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.model_wrap = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.image_cfg_scale = None
        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        self.sampler = sampler
        self.p = None
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None
        self.mask_before_denoising = False
        self.classic_ddim_eps_estimation = False

    @property
    def inner_model(self):
        raise NotImplementedError()

    def get_pred_x0(self, x_in, x_out, sigma):
        return x_out

    def update_inner_model(self):
        self.model_wrap = None
        c, uc = self.p.get_conds()
        self.sampler.sampler_extra_args["cond"] = c
        self.sampler.sampler_extra_args["uncond"] = uc

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException

        original_device, original_dtype = x.device, x.dtype

        if sd_samplers_common.apply_refiner(self, x):
            cond = self.sampler.sampler_extra_args["cond"]
            uncond = self.sampler.sampler_extra_args["uncond"]

        cond_composition, cond = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step) if uncond is not None else None

        if self.mask is not None:
            predictor = self.inner_model.inner_model.forge_objects.unet.model.predictor
            noise = torch.randn_like(self.init_latent).to(self.init_latent)
            noisy_init = predictor.noise_scaling(sigma[:, None, None, None], noise, self.init_latent, max_denoise=False)
            x = x * self.nmask + noisy_init * self.mask

        params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond, uncond, self)
        cfg_denoiser_callback(params)

        if self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg

        opts = shared.opts
        if opts.skip_early_cond > 0 and self.step / self.total_steps <= opts.skip_early_cond:
            cond_scale = 1.0
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
        elif (self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            cond_scale = 1.0
            self.p.extra_generation_params["NGMS"] = s_min_uncond
            if opts.s_min_uncond_all:
                self.p.extra_generation_params["NGMS all steps"] = opts.s_min_uncond_all

        denoised, _cond_pred, uncond_pred = sampling_function(
            self, denoiser_params=params, cond_scale=cond_scale, cond_composition=cond_composition
        )

        if self.need_last_noise_uncond:
            self.last_noise_uncond = (x - uncond_pred) / sigma[:, None, None, None]

        if self.mask is not None:
            blended = denoised * self.nmask + self.init_latent * self.mask
            if self.p.scripts is not None:
                from modules import scripts

                mba = scripts.MaskBlendArgs(
                    denoised, self.nmask, self.init_latent, self.mask, blended, denoiser=self, sigma=sigma
                )
                self.p.scripts.on_mask_blend(self.p, mba)
                blended = mba.blended_latent
            denoised = blended

        self.sampler.last_latent = denoised
        sd_samplers_common.store_latent(denoised)

        after = AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        cfg_after_cfg_callback(after)
        denoised = after.x

        self.step += 1
        return denoised.to(device=original_device, dtype=original_dtype)
