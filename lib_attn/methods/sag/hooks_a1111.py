"""SAG on A1111: a wrapper on the middle block's first self-attention records the attention each token receives on
each image's uncond row and first cond row; after CFG the base prediction (uncond where CFG runs, else cond) is
degraded inside the mask and run once more in a call of the method's own (same conditioning); the guidance
``s * (degraded input - degraded prediction)`` in x0 terms is added as the sampler's output change."""

from __future__ import annotations

from typing import Any

import torch

from lib_attn import batch as batchmod
from lib_attn.hooks import A1111Hooks
from lib_attn.methods.sag import METHOD
from lib_attn.methods.sag.core import attention_mass, degrade, sag_mask
from lib_attn.ops import grid_of


class Hooks(A1111Hooks):
    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.scale = 0.0
        self.mass: dict[tuple[str, int], torch.Tensor] = {}  # (branch, image) -> attention each token receives
        self.grid: tuple[int, int] = (0, 0)
        self.inputs: dict[str, tuple] = {}  # branch -> (x, sigma, text, image_cond) of those rows, one per image
        self.outs: dict[str, torch.Tensor] = {}

    def install(self, plan: Any, unet: Any, patches: Any) -> None:
        if plan is not None:
            patches.wrap_forward(unet.get_submodule(plan.layer.module_path), self._observe)

    def step_active(self) -> bool:
        plan = self.ctx.plan.sag
        self.scale = plan.scale_at(self.ctx.step, self.ctx.total_steps) if plan is not None else 0.0
        self.mass, self.inputs, self.outs = {}, {}, {}
        return self.scale > 0

    def prepare(self, params: Any, layout: Any) -> None:
        ic = params.image_cond
        has_ic = isinstance(ic, torch.Tensor) and int(ic.shape[0]) == int(params.x.shape[0])
        for branch, rows, text in (
            ("uncond", list(layout.uncond), params.text_uncond),
            ("cond", list(layout.first_cond), batchmod.take_rows(params.text_cond, list(layout.first_cond))),
        ):
            self.inputs[branch] = (params.x[rows], params.sigma[rows], text, ic[rows] if has_ic else None)

    def _rows(self, branch: str) -> list[int]:
        layout = self.ctx.st.layout
        return list(layout.uncond if branch == "uncond" else layout.first_cond)

    def _observe(self, module: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        out = call_next(*args, **kwargs)
        ctx = self.ctx
        if self.scale <= 0 or ctx.st is None or ctx.call is None or ctx.private:
            return out
        x = args[0]
        start, n = ctx.call
        if int(x.shape[0]) != n:
            ctx.fail(METHOD.field("enabled").error("the attention rows do not match the model call (Hypertile?)"))
            return out
        try:
            self.grid = grid_of(int(x.shape[1]), ctx.latent_hw)
        except ValueError as e:
            ctx.fail(METHOD.field("enabled").error(str(e)))
            return out
        # an observation: nothing for autograd to save (see attention_mass)
        with torch.no_grad():
            for branch in ("uncond", "cond"):
                for image, row in enumerate(self._rows(branch)):
                    if start <= row < start + n and (branch, image) not in self.mass:
                        r = x[row - start : row - start + 1]
                        self.mass[branch, image] = attention_mass(module.to_q(r), module.to_k(r), module.heads)
        return out

    def denoised(self, out: torch.Tensor) -> None:
        for branch in ("uncond", "cond"):
            self.outs[branch] = out[self._rows(branch)].clone()

    def _branch(self) -> str | None:
        """The uncond rows where CFG runs on them (the host computed them and the scale is above 1), else the cond
        rows; None where the attention of neither was seen."""
        cfg = self.ctx.cfg_scale()
        for branch in ("cond",) if cfg is not None and cfg <= 1 else ("uncond", "cond"):
            if all((branch, i) in self.mass for i in range(len(self.outs.get(branch, ())))):
                return branch
        return None

    def after_cfg(self, params: Any, delta: torch.Tensor) -> torch.Tensor:
        branch = self._branch() if self.outs else None
        if branch is None:
            return delta
        ctx, den = self.ctx, self.ctx.denoiser
        x, sigma, text, ic = self.inputs[branch]
        x0 = ctx.to_denoised(den, x, sigma, self.outs[branch])
        mass = torch.cat([self.mass[branch, i] for i in range(x.shape[0])])
        mask = sag_mask(mass, self.grid, tuple(x.shape[-2:]), ctx.plan.sag.threshold)
        degraded = degrade(x0, mask.to(x0), ctx.plan.sag.blur_sigma)
        x_deg = ctx.noised(degraded, ctx.noise_of(den, x, x0, sigma), sigma)
        out = ctx.model_call(x_deg, sigma, text, ic)
        guidance = (degraded - ctx.to_denoised(den, x_deg, sigma, out)) * self.scale
        return delta + ctx.output_delta(den, sigma, guidance).to(delta.dtype)
