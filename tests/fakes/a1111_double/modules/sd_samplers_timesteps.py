"""Double of modules/sd_samplers_timesteps.py: DDIM on the eps path.  The inner model returns eps and the
"sigma" the CFG denoiser sees is the UNet timestep; the mask is blended before the model call."""

import inspect

import torch
from modules import sd_samplers_common, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser


class CompVisTimestepsDenoiser(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CFGDenoiserTimesteps(CFGDenoiser):
    mask_before_denoising = True

    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = CompVisTimestepsDenoiser(shared.sd_model)
        return self.model_wrap


class CompVisSampler(sd_samplers_common.Sampler):
    def __init__(self, name, sd_model):
        super().__init__("ddim")
        self.name = name
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        # A1111 calls ``self.func(model, x, extra_args=, disable=, callback=, timesteps=)`` (a script may replace it)
        self.func = self._ddim_func

    def _ddim_func(self, model, x, timesteps, extra_args=None, callback=None, disable=None):
        return self._ddim(self.p, x, timesteps, extra_args or {})

    def _call_func(self, x, ts, extra):
        kw = {"timesteps": ts} if "timesteps" in inspect.signature(self.func).parameters else {}
        return self.func(self.model_wrap_cfg, x, extra_args=extra, disable=False, callback=self.callback_state, **kw)

    @staticmethod
    def timesteps(steps):
        return torch.arange(0, 1000, 1000 // steps)[:steps] + 1

    def _ddim(self, p, x, timesteps, extra):
        den = self.model_wrap_cfg
        ac = shared.sd_model.alphas_cumprod.to(x.dtype)
        alphas = ac[timesteps]
        alphas_prev = ac[torch.nn.functional.pad(timesteps[:-1], (1, 0))]
        alphas_prev[0] = ac[0] if len(timesteps) else 1.0
        s_in = x.new_ones([x.shape[0]])
        # A1111's ddim loops len(timesteps) - 1 times (the smallest timestep is never evaluated)
        for i in range(len(timesteps) - 1):
            index = len(timesteps) - 1 - i
            e_t = den(x, timesteps[index].item() * s_in, **extra)
            a_t, a_prev = alphas[index], alphas_prev[index]
            pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
            x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e_t
            self.last_latent = pred_x0
            self.callback_state({"x": x, "i": i, "denoised": pred_x0})
        return x

    def _extra(self, p, c, uc, image_conditioning):
        self.sampler_extra_args = {"cond": c, "image_cond": image_conditioning, "uncond": uc,
                                   "cond_scale": p.cfg_scale, "s_min_uncond": getattr(p, "s_min_uncond", 0.0)}
        return self.sampler_extra_args

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        self.initialize(p)
        den = self.model_wrap_cfg
        den.steps = den.total_steps = steps
        ts = self.timesteps(steps)
        extra = self._extra(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(steps, lambda: self._call_func(x, ts, extra))

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        t_enc = max(int(min(p.denoising_strength, 0.999) * steps), 1)
        self.initialize(p)
        den = self.model_wrap_cfg
        den.steps = den.total_steps = t_enc + 1  # A1111 launches t_enc + 1 steps (and evaluates t_enc - 1 times)
        den.init_latent = x
        all_ts = self.timesteps(steps)
        ts = all_ts[:t_enc]
        a = shared.sd_model.alphas_cumprod[all_ts[t_enc]].to(x.dtype)  # as A1111: the level of timesteps[t_enc]
        xi = a.sqrt() * x + (1 - a).sqrt() * noise
        self.last_latent = x
        extra = self._extra(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(t_enc + 1, lambda: self._call_func(xi, ts, extra))
