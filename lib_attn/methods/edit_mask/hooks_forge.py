"""Automatic edit mask on the Forge family: ``attn2`` replace patches on the mask layers record the cond rows'
cross-attention of the step's own call; the model input (before the call) and the prediction (after CFG) keep the
source outside the mask; the optional final inpainting pass samples once more with fresh model objects.  With Seeds
above 1, after the step's call each extra noise draw runs the cond rows once more (the step's input with the noise
swapped, marked as the method's own call); their maps join before the mask is updated."""

from __future__ import annotations

from typing import Any

import torch

from lib_attn.fields import SettingsError
from lib_attn.hooks import (
    MODE,
    ForgeHooks,
    cond_chunk,
    keep_source,
    source_latent,
    start_noise,
    with_transformer_option,
)
from lib_attn.methods.edit_mask import core as em
from lib_attn.methods.edit_mask.run import token_counter
from lib_attn.ops import grid_of

DRAW = "edit_mask_seeds"  # MODE of the extra draws' calls


class Hooks(ForgeHooks):
    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.seen: set = set()  # (step, layer) pairs whose maps are in: one call per step counts
        self.count_tokens: Any = None
        self.x_in: Any = None  # the step's model input after the blend (one row per image)
        self.draw: int | None = None  # the extra draw whose call is in progress

    def begin_sampling(self) -> None:
        self.count_tokens = token_counter(self.ctx.p.sd_model)
        self.run.begin_batch()

    def end_sampling(self) -> None:
        p = self.ctx.p
        self.run.finish_batch((int(p.width), int(p.height)), self.ctx.fail)

    def follow_up(self) -> Any:
        run = self.run
        if not run.inpaints_in_place or run.final is None:
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
            n = int(params.x.shape[0])
            prompts = run.prompts(ctx.p, n)
            try:
                run.start(prompts, self.count_tokens, z0.to(params.x), start_noise(params, z0), run.seeds(ctx.p, n))
            except SettingsError as e:
                ctx.fail(e)
        else:
            keep_source(run, params)
        self.x_in = params.x

    def attn2(self, key: tuple, q: Any, k: Any, v: Any, extra_options: dict) -> Any:
        """The probabilities are computed again for the cond rows of the step's first call only; the output is
        left to the host's attention."""
        if extra_options.get(MODE) == DRAW:
            self._draw_maps(q, k, extra_options)
            return None
        where = cond_chunk(self.ctx, key, q, extra_options, self.seen, self.run.settings.FIELDS["layers"])
        if where is not None:
            a, b, hw = where
            with torch.no_grad():
                probs = em.attention_probs(q[a:b], k[a:b], int(extra_options["n_heads"]))
            for i, pr in enumerate(probs):
                self.run.add(i, pr, hw)
        return None

    def _draw_maps(self, q: Any, k: Any, extra_options: dict) -> None:
        """An extra draw's call: its rows are the cond rows of the B images, in order."""
        if self.draw is None:
            return
        shape = extra_options.get("original_shape")
        try:
            hw = grid_of(int(q.shape[1]), (int(shape[-2]), int(shape[-1])))
        except (TypeError, ValueError) as e:
            self.ctx.fail(self.run.settings.FIELDS["layers"].error(f"cannot place the attention map: {e}"))
            return
        with torch.no_grad():
            probs = em.attention_probs(q, k, int(extra_options["n_heads"]))
        for i, pr in enumerate(probs):
            self.run.add(i, pr, hw)

    def _run_draws(self, args: dict) -> None:
        """With Seeds above 1: one cond-only call per extra draw, its input the step's with that draw's noise."""
        run, ctx, x = self.run, self.ctx, self.x_in
        if not run.extra_draws or x is None or ctx.failed() or int(x.shape[0]) != int(run.z0.shape[0]):
            return
        sigma = args["sigma"].to(x)
        z0 = run.z0.to(x)
        rows = run.redrawn(x, lambda noise: z0 + noise * sigma.view(-1, 1, 1, 1))
        options = with_transformer_option(args["model_options"], MODE, DRAW)
        b = int(x.shape[0])
        for d in range(run.extra_draws):
            self.draw = d
            try:
                ctx.calc(args["model"], args["cond"], None, rows[d * b : (d + 1) * b], sigma, options)
            finally:
                self.draw = None

    def post_cfg(self, args: dict, denoised: Any) -> Any:
        if self.ctx.plan.edit_mask is None:
            return denoised
        self._run_draws(args)
        if self.run.update(tuple(denoised.shape[-2:])) is not None:
            return self.run.blend_denoised(denoised)
        return denoised
