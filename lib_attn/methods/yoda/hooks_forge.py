"""Masked upscaling on the Forge family: at the pass's first call the source latent, the starting noise and the
map (DINO, or the UNet's own self-attention through ``attn1`` observers); at every call the model input keeps the
noised source outside the call's mask, and after CFG the prediction keeps the source there."""

from __future__ import annotations

from typing import Any

import torch

from lib_attn.fields import SettingsError
from lib_attn.hooks import ForgeHooks, cond_chunk, keep_source, source_latent, start_noise
from lib_attn.methods.yoda import core as yd


class Hooks(ForgeHooks):
    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.seen: set = set()  # (step, layer) pairs whose saliency is in (the "unet" source)
        self.at: tuple | None = None  # (model call, calls in the pass) of the step in progress

    def end_sampling(self) -> None:
        self.run.finish_pass(self.ctx.fail)

    def after_sampling(self) -> None:
        self.run.begin_pass(None)

    def begin_pass(self, plan: Any) -> None:
        if not self.ctx.failed():
            self.run.finish_pass(self.ctx.fail)  # the first pass before the hires pass
        self.run.begin_pass(plan)
        self.seen = set()

    def install(self, plan: Any) -> dict:
        return {"observe_attn1": {k.forge_key for k in plan.layers}} if plan is not None else {}

    def on_denoiser(self, params: Any) -> None:
        """First call of a pass: source latent (img2img's init latent, the hires pass's upscaled latent), the
        sampler's starting noise, the DINO map; every call: the model input keeps the noised source outside this
        call's mask (Forge's ``x`` has one row per image)."""
        self.at = None
        ctx, run = self.ctx, self.run
        if ctx.plan.yoda is None or ctx.failed():
            return
        den = params.denoiser
        z0 = source_latent(ctx, params)
        if z0 is None:
            ctx.fail(run.settings.FIELDS["enabled"].error("this sampling pass has no source latent to upscale"))
            return
        at = (int(getattr(den, "step", ctx.step)), ctx.services.pass_calls(den))
        self.at = at
        if not run.started:
            try:
                run.start_pass(ctx.p, z0.to(params.x), start_noise(params, z0))
            except SettingsError as e:
                ctx.fail(e)
                return
            run.mask_for(*at)  # the first call's input is the noised source everywhere: nothing to blend
            return
        if run.mask_for(*at) is not None:
            keep_source(run, params)

    def observe_attn1(self, key: tuple, q: Any, k: Any, extra_options: dict) -> None:
        """The "unet" source: per-token saliency of the cond rows at the pass's first call (once per layer)."""
        run = self.run
        if self.at is None or run.amap is not None:
            return
        where = cond_chunk(self.ctx, key, q, extra_options, self.seen, run.settings.FIELDS["source"])
        if where is None:
            return
        a, b, hw = where
        with torch.no_grad():
            sal = yd.self_attention_saliency(q[a:b], k[a:b], int(extra_options["n_heads"]))
        for i, s_ in enumerate(sal):
            run.add_unet(i, s_, hw)

    def post_cfg(self, args: dict, denoised: Any) -> Any:
        ctx = self.ctx
        if ctx.plan.yoda is None or self.at is None or ctx.failed():
            return denoised
        if self.run.mask_for(*self.at) is not None:  # the masks multiply with the edit mask's (same source)
            return self.run.blend_denoised(denoised)
        return denoised
