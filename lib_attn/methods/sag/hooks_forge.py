"""SAG on the Forge family: an observer on the middle block's first self-attention records the attention each token
receives on the uncond and the cond rows of the step's call; after CFG the base prediction (uncond where Forge ran
it, else cond) is degraded inside the mask and run once more (same conditioning, marked as the method's own call),
then ``denoised + s * (degraded - degraded prediction)``."""

from __future__ import annotations

from typing import Any

import torch

from lib_attn.hooks import MODE, ForgeHooks, with_transformer_option
from lib_attn.methods.sag import METHOD
from lib_attn.methods.sag.core import attention_mass, degrade, sag_mask
from lib_attn.ops import grid_of

BRANCHES = {0: "cond", 1: "uncond"}  # Forge's cond_or_uncond flags


class Hooks(ForgeHooks):
    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.mass: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}  # branch -> (mass, grid) of this step

    def install(self, plan: Any) -> dict:
        return {"observe_attn1": [plan.layer.forge_key]} if plan is not None else {}

    def on_denoiser(self, params: Any) -> None:
        self.mass = {}  # a new step: its first call records

    def observe_attn1(self, key: tuple, q: torch.Tensor, k: torch.Tensor, extra_options: dict) -> None:
        if extra_options.get(MODE) is not None:
            return  # a method's own call
        flags = list(extra_options.get("cond_or_uncond") or [])
        if not flags or q.shape[0] % len(flags):
            return
        chunk = q.shape[0] // len(flags)
        shape = extra_options["original_shape"]
        for flag, branch in BRANCHES.items():
            if flag not in flags or branch in self.mass:
                continue  # the first call of the step that holds these rows (not a later method's extra call)
            try:
                grid = grid_of(int(q.shape[1]), (int(shape[-2]), int(shape[-1])))
            except ValueError as e:
                self.ctx.fail(METHOD.field("enabled").error(str(e)))
                return
            a = flags.index(flag) * chunk
            mass = attention_mass(q[a : a + chunk], k[a : a + chunk], int(extra_options["n_heads"]))
            self.mass[branch] = (mass, grid)

    def post_cfg(self, args: dict, denoised: torch.Tensor) -> torch.Tensor:
        plan, ctx = self.ctx.plan.sag, self.ctx
        if plan is None:
            return denoised
        scale = plan.scale_at(ctx.step, ctx.total_steps)
        branch = "uncond" if "uncond" in self.mass else "cond"
        if scale <= 0 or branch not in self.mass:
            return denoised
        mass, grid = self.mass[branch]
        base, conds = args[f"{branch}_denoised"], args[branch]
        x, sigma = args["input"], args["sigma"]
        mask = sag_mask(mass, grid, tuple(x.shape[-2:]), plan.threshold).to(base)
        degraded = degrade(base, mask, plan.blur_sigma)
        options = with_transformer_option(args["model_options"], MODE, "sag")
        prediction, _ = ctx.calc(args["model"], conds, None, degraded + x - base, sigma, options)
        return denoised + (degraded - prediction) * scale
