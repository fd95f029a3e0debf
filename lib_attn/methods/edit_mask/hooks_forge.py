"""Automatic edit mask on the Forge family: ``attn2`` replace patches on the mask layers record the cond rows'
cross-attention of the step's own call; the model input (before the call) and the prediction (after CFG) keep the
source outside the mask; the optional final inpainting pass samples once more with fresh model objects."""

from __future__ import annotations

from typing import Any

import torch

from lib_attn.fields import SettingsError
from lib_attn.hooks import ForgeHooks, cond_chunk, keep_source, source_latent, start_noise
from lib_attn.methods.edit_mask import core as em
from lib_attn.methods.edit_mask.run import token_counter


class Hooks(ForgeHooks):
    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.seen: set = set()  # (step, layer) pairs whose maps are in: one call per step counts
        self.count_tokens: Any = None

    def begin_sampling(self) -> None:
        self.count_tokens = token_counter(self.ctx.p.sd_model)
        self.run.begin_batch()

    def end_sampling(self) -> None:
        p = self.ctx.p
        self.run.finish_batch((int(p.width), int(p.height)), self.ctx.fail)

    def follow_up(self) -> Any:
        run = self.run
        if run.settings.final != "inpaint" or run.final is None:
            return None
        return run.inpainting(self.ctx.p)

    def install(self, plan: Any) -> dict:
        if plan is None:
            return {}
        self.run.plan = plan
        self.seen = set()
        return {"attn2": {k.forge_key for k in plan.layers}}

    def on_denoiser(self, params: Any) -> None:
        """First step of a batch: source latent, starting noise and prompt words; later steps: the model input
        keeps the source, noised to this level, outside the mask (Forge's ``x`` has one row per image)."""
        ctx, run = self.ctx, self.run
        if ctx.plan.edit_mask is None or ctx.failed():
            return
        z0 = source_latent(ctx, params, from_p=True)
        if z0 is None:
            ctx.fail(run.settings.FIELDS["enabled"].error("no init latent to keep (img2img only)"))
            return
        if not run.started:
            prompts = run.prompts(ctx.p, int(params.x.shape[0]))
            try:
                run.start(prompts, self.count_tokens, z0.to(params.x), start_noise(params, z0))
            except SettingsError as e:
                ctx.fail(e)
            return
        keep_source(run, params)

    def attn2(self, key: tuple, q: Any, k: Any, v: Any, extra_options: dict) -> Any:
        """The probabilities are computed again for the cond rows of the step's first call only; the output is
        left to the host's attention."""
        where = cond_chunk(self.ctx, key, q, extra_options, self.seen, self.run.settings.FIELDS["layers"])
        if where is not None:
            a, b, hw = where
            with torch.no_grad():
                probs = em.attention_probs(q[a:b], k[a:b], int(extra_options["n_heads"]))
            for i, pr in enumerate(probs):
                self.run.add(i, pr, hw)
        return None

    def post_cfg(self, args: dict, denoised: Any) -> Any:
        if self.ctx.plan.edit_mask is not None and self.run.update(tuple(denoised.shape[-2:])) is not None:
            return self.run.blend_denoised(denoised)
        return denoised
