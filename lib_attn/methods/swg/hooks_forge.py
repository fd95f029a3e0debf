"""SWG on the Forge family: after CFG, the cond rows run once per window of the latent (marked as the method's own
calls, so the other methods pass through), joined, and ``denoised + s * (cond - windows)``.  A conditioning Forge
would have to crop with the latent (an inpainting model's image, ControlNet) fails with a message."""

from __future__ import annotations

from typing import Any

import torch

from lib_attn.hooks import MODE, ForgeHooks, with_transformer_option
from lib_attn.methods.swg import METHOD
from lib_attn.methods.swg.core import join, plan_windows
from lib_attn.settings import SettingsError


def _spatial_conditioning(conds: Any) -> str | None:
    for c in conds or ():
        if not isinstance(c, dict):
            continue
        if c.get("control") is not None:
            return "ControlNet"
        if "c_concat" in (c.get("model_conds") or {}) or c.get("concat") is not None:
            return "an image conditioning (inpainting or instruct model)"
    return None


class Hooks(ForgeHooks):
    def post_cfg(self, args: dict, denoised: torch.Tensor) -> torch.Tensor:
        plan, ctx = self.ctx.plan.swg, self.ctx
        if plan is None or ctx.failed():
            return denoised
        scale = plan.scale_at(ctx.step, ctx.total_steps)
        if scale <= 0:
            return denoised
        x, sigma, conds = args["input"], args["sigma"], args["cond"]
        what = _spatial_conditioning(conds)
        if what is not None:
            ctx.fail(METHOD.field("enabled").error(f"cannot run the model on windows with {what}"))
            return denoised
        try:
            wins = plan_windows(plan, int(x.shape[-2]), int(x.shape[-1]), METHOD.field("window"))
        except SettingsError as e:
            ctx.fail(e)
            return denoised
        options = with_transformer_option(args["model_options"], MODE, "swg")
        preds = [ctx.calc(args["model"], conds, None, x[..., ys, xs], sigma, options)[0] for ys, xs, _ in wins]
        weak = join(preds, wins, denoised)
        return denoised + (args["cond_denoised"] - weak) * scale
