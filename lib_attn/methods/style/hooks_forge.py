"""Style reference on the Forge family: after CFG, a capture call on the noised style images, then the inner
gradient steps on the negative-prompt prediction's features (the host samples under ``inference_mode``, so every
tensor the graph keeps is made outside it); the recording layers are ``attn1`` replace patches."""

from __future__ import annotations

from typing import Any

import torch

from lib_attn.hooks import MODE, ForgeHooks, with_transformer_option
from lib_attn.methods.style import core as style
from lib_attn.methods.style.run import error_for


class Hooks(ForgeHooks):
    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.recorder = style.Recorder()
        self.keys: set = set()
        self.track = style.SigmaTrack()  # the pass's noise levels: the next one's estimate (the step gain)

    def check(self, plans: tuple) -> None:
        if self.run.settings.checkpointing == "on" and any(plan.style is not None for plan in plans):
            # Forge's blocks add in place: recomputed activations would be overwritten (wrong gradients)
            raise self.run.settings.FIELDS["checkpointing"].error(
                "gradient checkpointing is not available on Forge (its transformer blocks add in place, "
                "which makes recomputed gradients wrong); use auto or off"
            )

    def begin_sampling(self) -> None:
        self.run.begin(self.ctx.p)

    def sampler_function(self) -> Any:
        return self.run.sampler_function()

    def begin_pass(self, plan: Any) -> None:
        self.track = style.SigmaTrack()

    def install(self, plan: Any) -> dict:
        self.keys = set()
        if plan is None:
            return {}
        self.recorder = style.Recorder(plan.tau, plan.content_weight)
        self.keys = {k.forge_key for k in plan.layers}
        return {"attn1": self.keys}

    def attn1(self, key: tuple, q: Any, k: Any, v: Any, extra_options: dict) -> Any:
        if self.recorder.mode is None:
            return None
        return self.recorder.attend(key, q, k, v, int(extra_options["n_heads"]))

    def post_cfg(self, args: dict, denoised: Any) -> Any:
        plan, ctx = self.ctx.plan.style, self.ctx
        if plan is not None:
            self.track.observe(float(args["sigma"].flatten()[0]))
        if plan is None or ctx.failed() or not plan.active_at(ctx.step, ctx.total_steps):
            return denoised
        try:
            if self.run.transfer is not None:
                self._transfer_step(args)
                return denoised  # the transfer's loop keeps its own latent; the prediction is not used
            return denoised + self._delta(args, denoised)
        except Exception as e:  # the host would log and drop it: fail the generation with the cause
            ctx.fail(error_for(e))
            return denoised

    def _capture(self, args: dict, clean: bool) -> tuple:
        """This step's capture call (no grad) on the style rows (and img2img's content rows): noised to the step's
        level, or with ``clean`` fed to the UNet as they are (mode transfer).  Returns ``(x, sigma, scale, z_ref,
        rows, ref_of, x_cap, forward)``, made outside inference mode (the graph keeps them); ``forward(z)`` runs the
        model on ``z`` with the negative prompt, the paper's null-prompt features."""
        si, ctx = self.run, self.ctx
        model = args["model"]
        conds = args.get("uncond") or args["cond"]
        with torch.inference_mode(False):
            x, sigma = args["input"].clone(), args["sigma"].clone()
            scale = style.vp_scale(sigma)
            z_ref = si.latents(ctx.p, ctx.services.encode, x.shape, x).clone()
            rows, z, noise, owner, ref_of = si.capture_batch(z_ref, x, ctx.step, ctx.plan.style.content_weight > 0)
            level = sigma[owner].view(-1, 1, 1, 1)
            x_cap = z * style.vp_scale(sigma[owner]).to(z) if clean else z + noise * level  # clean: the UNet sees z
        options = with_transformer_option(args["model_options"], MODE, "off")
        self.recorder.clear()
        with torch.inference_mode(False), torch.no_grad(), self.recorder.capturing(rows, ref_of):
            ctx.calc(model, conds, None, x_cap, sigma[owner], options)

        def forward(z_in: Any) -> Any:
            return ctx.calc(model, conds, None, z_in, sigma, options)

        return x, sigma, scale, z_ref, rows, ref_of, x_cap, forward

    def _delta(self, args: dict, denoised: Any) -> Any:
        """AD guidance for this step; the AD gradient is taken at the latent being sampled (classifier-guidance
        style), with Adam on the VP latent; the latent's displacement (and the noisy AdaIN's) moves the prediction,
        amplified by the step gain so that the next latent moves by it."""
        plan, si, rec, ctx = self.ctx.plan.style, self.run, self.recorder, self.ctx
        x, sigma, scale, z_ref, rows, ref_of, x_cap, forward = self._capture(args, clean=False)
        with torch.inference_mode(False):
            d = denoised.clone()
            target = si.adain_prediction(d, z_ref, ref_of) if plan.adain == "denoised" else d
        unet = args["model"].diffusion_model
        with style.normal_weights(unet), style.snapshot_saved_tensors(unet):
            disp, losses = style.guided_displacement(forward, rec, x, plan.strength, plan.iters, scale=scale)
        rec.clear()
        si.losses.append(losses)
        with torch.inference_mode(False):
            if plan.adain == "noisy":
                disp = disp + si.adain_shift(x, x_cap, rows, ref_of)
            gain = self.track.gain(float(sigma.flatten()[0]), ctx.total_steps - ctx.step - 1)
            return (target + gain * disp - d).to(denoised.dtype)

    def _transfer_step(self, args: dict) -> None:
        """Mode transfer: one Adam step on the latent being optimized (the UNet sees it clean at this step's
        timestep), against the style and content losses of the clean references captured at the same timestep."""
        x, _, scale, *_, forward = self._capture(args, clean=True)
        unet = args["model"].diffusion_model
        with style.normal_weights(unet), style.snapshot_saved_tensors(unet):
            loss = self.run.transfer.step(forward, self.recorder, scale, x.dtype)
        self.recorder.clear()
        self.run.losses.append([loss])
