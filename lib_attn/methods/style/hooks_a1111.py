"""Style reference on A1111: recording wrappers on the style layers; at a guided step the references (and the
img2img content) are captured in a private call, the WebUI's own uncond rows run as the first guided forward where
A1111 is sure to run them in one call (else a forward of its own), and after CFG the inner gradient steps move the
prediction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lib_attn import batch as batchmod
from lib_attn.hooks import A1111Hooks
from lib_attn.methods.style import core as style
from lib_attn.methods.style.run import error_for


class Hooks(A1111Hooks):
    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.recorder = style.Recorder()
        self.inp: dict | None = None  # per image x, sigma, conditioning of the feature passes at this step
        self.reuse = False  # the references were captured and the host's uncond rows run the guided pass
        self.first: tuple | None = None  # (latent leaf, loss) of that first guided forward
        self.track = style.SigmaTrack()  # the pass's noise levels: the next one's estimate (the step gain)
        self.captured: tuple | None = None  # (capture rows, their model input) of this step: the noisy AdaIN

    def begin_sampling(self) -> None:
        self.run.begin(self.ctx.p)

    def sampler_function(self) -> Any:
        return self.run.sampler_function()

    def begin_pass(self, plan: Any, new_pass: bool) -> None:
        self.recorder.clear()
        self.track = style.SigmaTrack()

    def after_sampling(self) -> None:
        self.recorder.clear()

    def install(self, plan: Any, unet: Any, patches: Any) -> None:
        if plan is None:
            return
        self.recorder = style.Recorder(plan.tau, plan.content_weight)
        for key in plan.layers:
            patches.wrap_forward(
                unet.get_submodule(key.module_path), style.self_attention_wrapper(self.recorder, key.module_path)
            )
        if plan.checkpoint:
            for block in style.blocks(unet):
                patches.wrap_forward(block, style.checkpointed(self.recorder))
        patches.wrap_forward(unet, self._unet)

    def step_active(self) -> bool:
        ctx, plan = self.ctx, self.ctx.plan.style
        self.inp, self.reuse, self.first, self.captured = None, False, None, None
        if plan is not None and ctx.sigma is not None:
            self.track.observe(float(ctx.k_sigma(ctx.denoiser, ctx.sigma[:1])[0]))
        return plan is not None and plan.active_at(ctx.step, ctx.total_steps)

    def prepare(self, params: Any, layout: Any) -> None:
        """What the feature passes of this step need, per image: the latent being sampled, its sigma and the
        unconditional (negative-prompt) conditioning, as the paper's null-prompt feature extractor."""
        ctx, plan = self.ctx, self.ctx.plan.style
        if plan is None or not plan.active_at(ctx.step, ctx.total_steps):
            return
        first = list(layout.first_cond)
        n = layout.n_images
        ic = params.image_cond
        has_ic = isinstance(ic, torch.Tensor) and int(ic.shape[0]) == layout.n_cond + n
        self.inp = {
            "x": params.x[first].detach().clone(),
            "sigma": params.sigma[first].detach().clone(),
            "text": params.text_uncond,
            "image_cond": ic[-n:] if has_ic else None,
        }
        self.reuse = not ctx.uncond_rows_transformed and self._reuse(params, layout)

    def _reuse(self, params: Any, layout: Any) -> bool:
        """Whether the host's uncond rows can be the first guided forward of this step (one UNet row per image saved):
        the guided pass runs the latent being sampled with the negative-prompt conditioning, which is what those rows
        are, when A1111 is sure to run them.  If so, the references are captured now, before the host's call."""
        ctx, inp = self.ctx, self.inp
        if ctx.cfg_scale() is None or not ctx.in_one_call(layout):
            return False
        u = slice(int(params.x.shape[0]) - layout.n_images, None)  # no rows inserted yet: the uncond rows are last
        if not (torch.equal(params.x[u], inp["x"]) and torch.equal(params.sigma[u], inp["sigma"])):
            return False
        try:
            self._capture()
        except Exception as e:  # the host would log and drop it: fail the generation with the cause
            ctx.fail(error_for(e))
            return False
        return True

    def _capture(self) -> None:
        """One private capture call (no grad): the references (and the img2img content) noised to this step's
        level."""
        ctx, plan, si, rec = self.ctx, self.ctx.plan.style, self.run, self.recorder
        den = ctx.denoiser
        x, sigma, text, ic = self.inp["x"], self.inp["sigma"], self.inp["text"], self.inp["image_cond"]
        z_ref = si.latents(ctx.p, ctx.services.encode, x.shape, x)
        rows, clean, noise, owner, ref_of = si.capture_batch(z_ref, x, ctx.step, plan.content_weight > 0)
        rec.clear()
        if si.transfer is not None:  # the style transfer feeds the UNet the clean latents at the step's timestep
            x_cap = clean / ctx.unet_input_scale(den, sigma[owner], clean)
        else:
            x_cap = ctx.noised(clean, noise, sigma[owner])
        self.captured = (rows, x_cap.detach())
        with (
            style.builtin_checkpointing_off(ctx.unet(den)),
            torch.inference_mode(False),
            torch.no_grad(),
            rec.capturing(rows, ref_of),
        ):
            den.inner_model(x_cap, sigma[owner], cond=self._cond(text, ic, owner, x))

    def _unet(self, module: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        """UNet forward wrapper: in a step whose guided pass reuses the host's uncond rows, those rows (the tail of
        the call) run with grad and the style layers computing the loss; the other rows run as they are."""
        ctx = self.ctx
        st, call = ctx.st, ctx.call
        if st is None or call is None or not self.reuse or self.first is not None or ctx.private:
            return call_next(*args, **kwargs)
        start, n = call
        u = st.layout.uncond
        if u.stop != start + n or u.start < start:  # not the whole uncond span at the end of this call
            return call_next(*args, **kwargs)
        a = u.start - start
        sub_args, sub_kwargs = batchmod.slice_args(args, n, a, n), batchmod.slice_kwargs(kwargs, n, a, n)
        x, rec, latent = sub_args[0], self.recorder, self.inp["x"]
        c_in = ctx.unet_input_scale(st.denoiser, self.inp["sigma"], latent)
        probe = latent * c_in  # also the VP latent the inner steps optimize (k-diffusion: c_in = 1 / sqrt(1 + s^2))
        # not the host's input after all (an inpainting model's concatenated channels): the call runs as it is and
        # the guided forward runs on its own later; the dtype may differ (A1111's upcast sampling casts the input
        # to the UNet's dtype first)
        if probe.shape != x.shape or not torch.equal(probe.to(x.dtype), x):
            return call_next(*args, **kwargs)
        head = ctx.sub_call(call_next, args, kwargs, n, 0, a) if a > 0 else None
        with ctx.call_span(start + a, n - a):
            try:
                with style.grad_enabled():
                    # the leaf is the VP latent (as in the separate guided forward), which is what the UNet sees
                    z = style.leaf(probe)
                    rec.terms = []
                    with style.builtin_checkpointing_off(module), style.normal_weights(module), rec.guided():
                        tail = call_next(z.to(x.dtype), *sub_args[1:], **sub_kwargs)
                    loss = rec.loss()
                    rec.terms = []
            except Exception as e:
                raise error_for(e) from e
        if loss is None:
            raise RuntimeError("Attention Toolkit: the style layers were not reached by the model call")
        self.first = (z, loss)
        tail = tail.detach()
        return tail if head is None else torch.cat([head, tail.to(head.dtype)])

    def after_cfg(self, params: Any, delta: torch.Tensor) -> torch.Tensor:
        if self.inp is None or self.ctx.failed():  # after a failure the generation fails anyway
            return delta
        try:
            if self.run.transfer is not None:
                self._transfer_step(self.ctx.denoiser)
                return delta  # the transfer's loop keeps its own latent; the prediction is not used
            return delta + self._delta(self.ctx.denoiser, params.x + delta)
        except Exception as e:  # the host would log and drop it: fail the generation with the cause
            self.ctx.fail(error_for(e))
            return delta

    def _delta(self, den: Any, out: torch.Tensor) -> torch.Tensor:
        """The change the style guidance makes to this step's prediction ``out`` (B rows; denoised for k-diffusion
        samplers, eps for A1111's timestep samplers).  The AD gradient is taken at the latent being sampled
        (classifier-guidance style), with Adam on the VP latent; the latent's displacement (and the noisy AdaIN's)
        moves the prediction, amplified by the step gain so that the next latent moves by it."""
        ctx, plan, si = self.ctx, self.ctx.plan.style, self.run
        x, sigma, text, ic = self.inp["x"], self.inp["sigma"], self.inp["text"], self.inp["image_cond"]
        n = x.shape[0]
        ref_of = si.ref_index(n)
        denoised = ctx.to_denoised(den, x, sigma, out)
        target = denoised
        if plan.adain == "denoised":
            z_ref = si.latents(ctx.p, ctx.services.encode, x.shape, x)
            target = si.adain_prediction(denoised, z_ref, ref_of)
        if not self.reuse:
            self._capture()
        unet = ctx.unet(den)
        rec = self.recorder
        cond = self._cond(text, ic, list(range(n)), x)
        c = ctx.x_per_denoised(den, sigma, x)
        scale = 1 / ctx.unet_input_scale(den, sigma, x)
        first, self.first = self.first, None
        with style.builtin_checkpointing_off(unet), style.normal_weights(unet):
            disp, losses = style.guided_displacement(
                lambda z: den.inner_model(z, sigma, cond=cond),
                rec,
                x,
                plan.strength,
                plan.iters,
                first=first,
                scale=scale,
            )
        rec.clear()
        si.losses.append(losses)
        if plan.adain == "noisy" and self.captured is not None:
            disp = disp + si.adain_shift(x, self.captured[1], self.captured[0], ref_of)
        k_sigma = float(ctx.k_sigma(den, sigma[:1])[0])
        gain = self.track.gain(k_sigma, ctx.total_steps - ctx.step - 1)
        return ctx.from_denoised(den, x, sigma, target + gain * disp / c) - out

    def _transfer_step(self, den: Any) -> None:
        """Mode transfer: one Adam step on the latent being optimized (the UNet sees it clean at this step's
        timestep), against the style and content losses of the clean references captured at the same timestep."""
        ctx, si = self.ctx, self.run
        x, sigma, text, ic = self.inp["x"], self.inp["sigma"], self.inp["text"], self.inp["image_cond"]
        if not self.reuse:
            self._capture()
        unet = ctx.unet(den)
        cond = self._cond(text, ic, list(range(x.shape[0])), x)
        scale = 1 / ctx.unet_input_scale(den, sigma, x)
        first, self.first = self.first, None
        with style.builtin_checkpointing_off(unet), style.normal_weights(unet):
            loss = si.transfer.step(
                lambda z: den.inner_model(z, sigma, cond=cond), self.recorder, scale, x.dtype, first
            )
        self.recorder.clear()
        si.losses.append([loss])

    def _cond(self, text: Any, ic: torch.Tensor | None, rows: list[int], x: torch.Tensor) -> dict:
        t = batchmod.take_rows(text, rows)
        if isinstance(text, Mapping):
            t = self.ctx.like(text, t)
        return self.ctx.condition(t, ic[rows] if ic is not None else None, text, x[:1].expand(len(rows), -1, -1, -1))
