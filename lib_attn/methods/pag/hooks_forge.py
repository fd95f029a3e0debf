"""PAG on the Forge family: after CFG, one more call on the cond rows with an identity attention map on the chosen
layers (an ``attn1`` replace patch in a copy of the model options), then ``denoised + s * (cond - perturbed)``.
It also runs where Forge skips the uncond rows (CFG 1, hires ``hr_cfg`` 1), where ``denoised`` is the cond."""

from __future__ import annotations

from typing import Any

from lib_attn.hooks import ForgeHooks, with_attn1_replace


def identity_attention(q: Any, k: Any, v: Any, extra_options: Any = None, **kwargs: Any) -> Any:
    """attn1 replace patch: the identity attention map gives every token its own value."""
    return v


def _timestep(model: Any, sigma: Any) -> float | None:
    for owner in ("predictor", "model_sampling"):
        obj = getattr(model, owner, None)
        if obj is not None and hasattr(obj, "timestep"):
            return float(obj.timestep(sigma[:1])[0])
    return None


class Hooks(ForgeHooks):
    def post_cfg(self, args: dict, denoised: Any) -> Any:
        plan, ctx = self.ctx.plan.pag, self.ctx
        if plan is None:
            return denoised
        model, sigma = args["model"], args["sigma"]
        scale = plan.scale_at(ctx.step, ctx.total_steps, _timestep(model, sigma))
        if scale <= 0:
            return denoised
        keys = [k.forge_key for k in plan.layers]
        options = with_attn1_replace(args["model_options"], identity_attention, keys)
        perturbed, _ = ctx.calc(model, args["cond"], None, args["input"], sigma, options)
        return denoised + (args["cond_denoised"] - perturbed) * scale
