"""Double of modules/sd_samplers_kdiffusion.py: the REAL k-diffusion samplers behind A1111's CFGDenoiser."""

from types import SimpleNamespace

import k_diffusion.external
import k_diffusion.sampling
import torch
from modules import sd_samplers_common, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser

# name: (k_diffusion.sampling function, second order, needs a Brownian noise sampler, karras schedule)
SAMPLERS = {
    "Euler": ("sample_euler", False, False, False),
    "Euler a": ("sample_euler_ancestral", False, False, False),
    "Heun": ("sample_heun", True, False, False),
    "DPM2": ("sample_dpm_2", True, False, True),
    "LMS": ("sample_lms", False, False, False),
    "DPM++ 2M": ("sample_dpmpp_2m", False, False, True),
    "DPM++ SDE": ("sample_dpmpp_sde", True, True, True),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", False, True, True),
}


class CFGDenoiserKDiffusion(CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            v = shared.sd_model.parameterization == "v"
            cls = k_diffusion.external.CompVisVDenoiser if v else k_diffusion.external.CompVisDenoiser
            self.model_wrap = cls(shared.sd_model)
        return self.model_wrap


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, name, sd_model):
        funcname, self.second_order, self.brownian, self.karras = SAMPLERS[name]
        super().__init__(funcname)
        self.name = name
        # A1111 gives every sampler its SamplerData as ``config`` (sd_samplers.create_sampler)
        self.config = SimpleNamespace(name=name, options={"second_order": self.second_order})
        self.func = getattr(k_diffusion.sampling, funcname)
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)

    def get_sigmas(self, p, steps):
        wrap = self.model_wrap_cfg.inner_model
        if self.karras:
            return k_diffusion.sampling.get_sigmas_karras(steps, float(wrap.sigmas[0]), float(wrap.sigmas[-1]),
                                                          device=wrap.sigmas.device)
        return wrap.get_sigmas(steps)

    def _kwargs(self, p, x, sigmas):
        kw = {"sigmas": sigmas, "callback": self.callback_state, "disable": True}
        if self.brownian:
            sig = sigmas[sigmas > 0]
            kw["noise_sampler"] = k_diffusion.sampling.BrownianTreeNoiseSampler(
                x, float(sig.min()), float(sig.max()), seed=int(p.seeds[0]) if getattr(p, "seeds", None) else 0)
        return kw

    def _extra_args(self, p, conditioning, unconditional_conditioning, image_conditioning):
        self.sampler_extra_args = {
            "cond": conditioning, "image_cond": image_conditioning, "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale, "s_min_uncond": getattr(p, "s_min_uncond", 0.0),
        }
        return self.sampler_extra_args

    def _launch(self, p, steps, x, sigmas, extra):
        den = self.model_wrap_cfg
        den.steps = steps
        den.total_steps = steps * (2 if self.second_order else 1)
        torch.manual_seed(int(p.seeds[0]) if getattr(p, "seeds", None) else 0)  # ancestral noise, reproducible
        kw = self._kwargs(p, x, sigmas)
        return self.launch_sampling(steps, lambda: self.func(den, x, extra_args=extra, **kw))

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        self.initialize(p)
        sigmas = self.get_sigmas(p, steps)
        x = x * sigmas[0]
        self.last_latent = x
        extra = self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self._launch(p, steps, x, sigmas, extra)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        self.initialize(p)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = x + noise * sigma_sched[0]
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        extra = self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self._launch(p, t_enc + 1, xi, sigma_sched, extra)
