"""``modules.sd_samplers_common`` (subset used by the k-diffusion samplers)."""

from __future__ import annotations

import inspect
from collections import namedtuple

import k_diffusion.sampling
import numpy as np
import torch
from modules import devices, shared
from modules.shared import opts, state
from PIL import Image

SamplerDataTuple = namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])


class SamplerData(SamplerDataTuple):
    def total_steps(self, steps):
        return steps * 2 if self.options.get("second_order", False) else steps


def setup_img2img_steps(p, steps=None):
    if opts.img2img_fix_steps or steps is not None:
        requested = steps or p.steps
        steps = int(requested / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested - 1
    else:
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc


approximation_indexes = {"Full": 0, "Approx NN": 1, "Approx cheap": 2, "TAESD": 3}


def samples_to_images_tensor(sample, approximation=None, model=None):
    if approximation == 2:
        from modules import sd_vae_approx

        return sd_vae_approx.cheap_approximation(sample)
    if model is None:
        model = shared.sd_model
    return model.decode_first_stage(sample)


def decode_first_stage(model, x):
    return samples_to_images_tensor(x, 0, model)


def single_sample_to_image(sample, approximation=None):
    x = samples_to_images_tensor(sample.unsqueeze(0), approximation)[0] * 0.5 + 0.5
    x = (x.cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(np.moveaxis(x.numpy(), 0, 2))


def sample_to_image(samples, index=0, approximation=None):
    return single_sample_to_image(samples[index], approximation)


def images_tensor_to_samples(image, approximation=None, model=None):
    """image in [0, 1] -> latent"""
    if model is None:
        model = shared.sd_model
    image = image.to(shared.device, dtype=devices.dtype_vae) * 2 - 1
    if len(image) > 1:
        return torch.stack([model.get_first_stage_encoding(model.encode_first_stage(img[None]))[0] for img in image])
    return model.get_first_stage_encoding(model.encode_first_stage(image))


def store_latent(decoded):
    state.current_latent = decoded


class InterruptedException(BaseException):
    pass


def apply_refiner(cfg_denoiser, x):
    if getattr(cfg_denoiser.p, "refiner_checkpoint_info", None) is not None:
        raise NotImplementedError("the refiner is not part of the Forge double")
    return False


class TorchHijack:
    """Stands in for ``torch`` inside k_diffusion.sampling so that ``randn_like`` draws from ``p.rng``."""

    def __init__(self, p):
        self.rng = p.rng

    def __getattr__(self, item):
        if item == "randn_like":
            return self.randn_like
        if hasattr(torch, item):
            return getattr(torch, item)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{item}'")

    def randn_like(self, x):
        return self.rng.next()


class Sampler:
    def __init__(self, funcname):
        self.funcname = funcname
        self.func = funcname
        self.extra_params = []
        self.sampler_noises = None
        self.stop_at = None
        self.eta = None
        self.config: SamplerData = None
        self.last_latent = None
        self.s_min_uncond = None
        self.s_churn = 0.0
        self.s_tmin = 0.0
        self.s_tmax = float("inf")
        self.s_noise = 1.0
        self.eta_option_field = "eta_ancestral"
        self.eta_infotext_field = "Eta"
        self.eta_default = 1.0
        self.conditioning_key = "crossattn"
        self.p = None
        self.model_wrap_cfg = None
        self.sampler_extra_args = None
        self.options = {}

    def callback_state(self, d):
        step = d["i"]
        if self.stop_at is not None and step > self.stop_at:
            raise InterruptedException
        state.sampling_step = step
        shared.total_tqdm.update()

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        state.sampling_steps = steps
        state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent
        finally:
            # The WebUI leaves its TorchHijack in k_diffusion.sampling; the double restores torch so that
            # reference runs made by tests after a generation draw from torch again.
            k_diffusion.sampling.torch = torch

    def number_of_needed_noises(self, p):
        return p.steps

    def initialize(self, p) -> dict:
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = p.mask if hasattr(p, "mask") else None
        self.model_wrap_cfg.nmask = p.nmask if hasattr(p, "nmask") else None
        self.model_wrap_cfg.step = 0
        self.model_wrap_cfg.image_cfg_scale = getattr(p, "image_cfg_scale", None)
        self.eta = p.eta if p.eta is not None else getattr(opts, self.eta_option_field, 0.0)
        self.s_min_uncond = getattr(p, "s_min_uncond", 0.0)

        k_diffusion.sampling.torch = TorchHijack(p)

        extra = {}
        parameters = inspect.signature(self.func).parameters
        for name in self.extra_params:
            if hasattr(p, name) and name in parameters:
                extra[name] = getattr(p, name)
        if "eta" in parameters:
            if self.eta != self.eta_default:
                p.extra_generation_params[self.eta_infotext_field] = self.eta
            extra["eta"] = self.eta
        if self.extra_params:
            s_churn = getattr(opts, "s_churn", p.s_churn)
            s_tmin = getattr(opts, "s_tmin", p.s_tmin)
            s_tmax = getattr(opts, "s_tmax", p.s_tmax) or self.s_tmax
            s_noise = getattr(opts, "s_noise", p.s_noise)
            if "s_churn" in extra and s_churn != self.s_churn:
                extra["s_churn"] = s_churn
                p.extra_generation_params["Sigma churn"] = s_churn
            if "s_tmin" in extra and s_tmin != self.s_tmin:
                extra["s_tmin"] = s_tmin
                p.extra_generation_params["Sigma tmin"] = s_tmin
            if "s_tmax" in extra and s_tmax != self.s_tmax:
                extra["s_tmax"] = s_tmax
                p.extra_generation_params["Sigma tmax"] = s_tmax
            if "s_noise" in extra and s_noise != self.s_noise:
                extra["s_noise"] = s_noise
                p.extra_generation_params["Sigma noise"] = s_noise
        return extra

    def create_noise_sampler(self, x, sigmas, p):
        sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
        seeds = p.all_seeds[p.iteration * p.batch_size : (p.iteration + 1) * p.batch_size]
        return k_diffusion.sampling.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seeds)

    def add_infotext(self, p):
        if self.model_wrap_cfg.padded_cond_uncond:
            p.extra_generation_params["Pad conds"] = True
