"""Automatic edit mask on A1111: wrappers on the mask layers' cross-attention record each image's first cond row;
the model input (before any rows are inserted) and the prediction (after CFG) keep the source outside the mask.
With Seeds above 1, a row group of the extra noise draws (copies of each image's first cond row with the noise
swapped) rides in the step's model call; their maps are recorded too, their output is not used."""

from __future__ import annotations

from typing import Any

import torch

from lib_attn.fields import SettingsError
from lib_attn.hooks import A1111Hooks
from lib_attn.methods.edit_mask import core as em
from lib_attn.methods.edit_mask.run import token_counter
from lib_attn.ops import grid_of

GROUP = "edit_mask_seeds"  # the rows of the extra noise draws


class Hooks(A1111Hooks):
    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.count_tokens: Any = None
        self.on = False  # the mask builds and blends at the step in progress

    def begin_sampling(self) -> None:
        self.count_tokens = token_counter(self.ctx.sd_model())
        self.run.begin_batch()

    def end_sampling(self) -> None:
        p = self.ctx.p
        self.run.finish_batch((int(p.width), int(p.height)), self.ctx.fail)

    def follow_up(self) -> Any:
        """The optional final inpainting pass: the host samples once more, as an inpainting run with the final
        masks."""
        run = self.run
        if not run.inpaints_in_place or run.final is None:
            return None
        return run.inpainting(self.ctx.p)

    def install(self, plan: Any, unet: Any, patches: Any) -> None:
        if plan is None:
            return
        self.run.plan = plan
        for key in plan.layers:
            patches.wrap_forward(unet.get_submodule(key.module_path), self._attn2)

    def step_active(self) -> bool:
        self.on = self.ctx.plan.edit_mask is not None and not self.ctx.failed()
        return self.on

    def input(self, params: Any, layout: Any) -> bool:
        """At the first step of a batch: the source latent, the sampler's starting noise and the prompt words;
        later: the model input keeps the source (noised to each row's level) outside the mask."""
        if not self.on:
            return False
        ctx, run = self.ctx, self.run
        den = ctx.denoiser
        first = list(layout.first_cond)
        z0 = ctx.source_latent(params, layout, from_p=True)
        if z0 is None:
            ctx.fail(run.settings.FIELDS["enabled"].error("no init latent to keep (img2img only)"))
            self.on = False
            return False
        if not run.started:
            prompts = run.prompts(getattr(den, "p", None) or ctx.p, layout.n_images)
            noise = ctx.noise_of(den, params.x[first], z0.to(params.x), params.sigma[first])
            seeds = run.seeds(getattr(den, "p", None) or ctx.p, layout.n_images)
            try:
                run.start(prompts, self.count_tokens, z0, noise, seeds)
            except SettingsError as e:
                ctx.fail(e)
                self.on = False
                return False
        else:
            ctx.keep_source_input(run, params, layout)
        return True

    def rows(self, params: Any, layout: Any) -> tuple[list, list]:
        """With Seeds above 1: each image's first cond row again per extra noise draw (its input with draw k's noise
        instead of the sampler's), inserted in the step's call."""
        run = self.run
        if not self.on or not run.started or not run.extra_draws:
            return [], []
        first = list(layout.first_cond)
        x, sigma = params.x[first], params.sigma[first]
        z0 = run.z0.to(x)
        rows = run.redrawn(x, lambda noise: self.ctx.noised(z0, noise, sigma))
        k = run.extra_draws
        return [(GROUP, list(range(layout.n_images)) * k, {"x": rows, "sigma": sigma.repeat(k)})], []

    def blend_prediction(self, denoised: Any) -> Any:
        if self.on and self.run.update(self.ctx.latent_hw) is not None:
            return self.run.blend_denoised(denoised())
        return None

    def _attn2(self, module: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        """Cross-attention of the mask layers: the host's (optimized) attention gives the output; the probabilities
        are computed again only for each image's first cond row and the extra draws' rows in this call."""
        out = call_next(*args, **kwargs)
        ctx = self.ctx
        if ctx.st is None or ctx.call is None or not self.on or ctx.private:
            return out
        x = args[0]
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        if not isinstance(context, torch.Tensor):
            ctx.fail(self.run.settings.FIELDS["layers"].error("the cross-attention call has no text context"))
            return out
        where = ctx.first_cond_rows(x, self.run.settings.FIELDS["layers"])
        local = list(where[0]) if where is not None else []
        hw = where[1] if where is not None else None
        local += self._draw_rows(x)
        if not local:
            return out
        if hw is None:
            try:
                hw = grid_of(int(x.shape[1]), ctx.latent_hw)
            except ValueError as e:
                ctx.fail(self.run.settings.FIELDS["layers"].error(f"{e} (Hypertile?)"))
                return out
        rows = [j for _, j in local]
        with torch.no_grad():
            probs = em.cross_attention_probs(module, x[rows], context[rows])
        for (i, _), pr in zip(local, probs, strict=True):
            self.run.add(i, pr, hw)
        return out

    def _draw_rows(self, x: Any) -> list[tuple[int, int]]:
        """``(image, row in this call)`` of the extra draws' rows in the model call in progress."""
        st, call = self.ctx.st, self.ctx.call
        span = st.layout.group(GROUP)
        if not len(span) or int(x.shape[0]) != call[1]:
            return []
        src = st.layout.sources(GROUP)
        return [(src[g - span.start], g - call[0]) for g in span if call[0] <= g < call[0] + call[1]]
