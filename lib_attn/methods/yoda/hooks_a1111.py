"""Masked upscaling on A1111: at the pass's first call the source latent, the starting noise and the map (DINO, or
the UNet's own self-attention through observing wrappers); at every call the model input keeps the noised source
outside the call's mask, and after CFG the prediction keeps the source there."""

from __future__ import annotations

from typing import Any

import torch

from lib_attn.fields import SettingsError
from lib_attn.hooks import A1111Hooks
from lib_attn.methods.yoda import core as yd


class Hooks(A1111Hooks):
    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.at: tuple | None = None  # (model call, calls in the pass) at the step in progress
        self.on = False

    def end_sampling(self) -> None:
        self.run.finish_pass(self.ctx.fail)

    def after_sampling(self) -> None:
        self.run.begin_pass(None)

    def begin_pass(self, plan: Any, new_pass: bool) -> None:
        """A new pass (not a refiner's model swap inside one) has its own source and map."""
        if new_pass:
            if not self.ctx.failed():
                self.run.finish_pass(self.ctx.fail)  # the first pass before the hires pass
            self.run.begin_pass(plan)

    def install(self, plan: Any, unet: Any, patches: Any) -> None:
        if plan is None:
            return
        for key in plan.layers:
            patches.wrap_forward(unet.get_submodule(key.module_path), self._attn1)

    def step_active(self) -> bool:
        self.at = None
        self.on = self.ctx.plan.yoda is not None and not self.ctx.failed()
        return self.on

    def input(self, params: Any, layout: Any) -> bool:
        """First call of a pass: the pass's source latent (img2img's init latent, the hires pass's upscaled latent),
        the sampler's starting noise, the DINO map; every call: the model input keeps the source, noised to each
        row's level, outside this call's mask."""
        if not self.on:
            return False
        ctx, run = self.ctx, self.run
        den = ctx.denoiser
        first = list(layout.first_cond)
        z0 = ctx.source_latent(params, layout)
        if z0 is None:
            ctx.fail(run.settings.FIELDS["enabled"].error("this sampling pass has no source latent to upscale"))
            return False
        at = (int(getattr(den, "step", ctx.step)), ctx.services.pass_calls(den))
        if not run.started:
            noise = ctx.noise_of(den, params.x[first], z0.to(params.x), params.sigma[first])
            try:
                run.start_pass(getattr(den, "p", None) or ctx.p, z0, noise)
            except SettingsError as e:
                ctx.fail(e)
                return False
            run.mask_for(*at)  # the first call's input is the noised source everywhere: nothing to blend
            self.at = at
            return True
        if run.mask_for(*at) is not None:
            ctx.keep_source_input(run, params, layout)
        self.at = at
        return True

    def blend_prediction(self, denoised: Any) -> Any:
        if self.at is not None and self.run.mask_for(*self.at) is not None:  # multiplies with other masks
            return self.run.blend_denoised(denoised())
        return None

    def _attn1(self, module: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        """Self-attention of the "unet" source layers: at the pass's first call, the saliency of each image's first
        cond row (the output is the host's own)."""
        out = call_next(*args, **kwargs)
        ctx, run = self.ctx, self.run
        if ctx.st is None or ctx.call is None or self.at is None or ctx.private or run.amap is not None:
            return out
        x = args[0]
        where = ctx.first_cond_rows(x, run.settings.FIELDS["source"])
        if where is None:
            return out
        local, hw = where
        rows = [j for _, j in local]
        with torch.no_grad():
            sal = yd.self_attention_saliency(module.to_q(x[rows]), module.to_k(x[rows]), int(module.heads))
        for (i, _), s_ in zip(local, sal, strict=True):
            run.add_unet(i, s_, hw)
        return out
