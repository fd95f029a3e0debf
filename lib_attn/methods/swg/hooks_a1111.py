"""SWG on A1111: after CFG, the model runs on each window of each image's first cond row (calls of the method's own,
through ``ctx.model_call``, so the other methods' wrappers pass through); ``s * (cond - joined windows)`` is added to
the step's output (both are the sampler's output units, x0 or noise, cropped alike)."""

from __future__ import annotations

from typing import Any

import torch

from lib_attn import batch as batchmod
from lib_attn.hooks import A1111Hooks
from lib_attn.methods.swg import METHOD
from lib_attn.methods.swg.core import join, plan_windows
from lib_attn.settings import SettingsError


class Hooks(A1111Hooks):
    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.scale = 0.0
        self.inputs: tuple | None = None

    def step_active(self) -> bool:
        plan = self.ctx.plan.swg
        self.scale = plan.scale_at(self.ctx.step, self.ctx.total_steps) if plan is not None else 0.0
        self.inputs = None
        return self.scale > 0

    def prepare(self, params: Any, layout: Any) -> None:
        rows = list(layout.first_cond)
        ic = params.image_cond
        spatial = isinstance(ic, torch.Tensor) and ic.dim() == 4 and ic.shape[-2:] == params.x.shape[-2:]
        self.inputs = (
            params.x[rows],
            params.sigma[rows],
            batchmod.take_rows(params.text_cond, rows),
            ic[rows] if isinstance(ic, torch.Tensor) and int(ic.shape[0]) == int(params.x.shape[0]) else None,
            spatial,
        )

    def after_cfg(self, params: Any, delta: torch.Tensor) -> torch.Tensor:
        if self.inputs is None or self.ctx.cond_out is None:
            return delta
        x, sigma, text, ic, spatial = self.inputs
        try:
            wins = plan_windows(self.ctx.plan.swg, int(x.shape[-2]), int(x.shape[-1]), METHOD.field("window"))
        except SettingsError as e:
            self.ctx.fail(e)
            return delta
        preds = []
        for ys, xs, _ in wins:
            crop_ic = ic[..., ys, xs] if spatial and ic is not None else ic
            preds.append(self.ctx.model_call(x[..., ys, xs], sigma, text, crop_ic))
        weak = join(preds, wins, self.ctx.cond_out)
        return delta + ((self.ctx.cond_out - weak) * self.scale).to(delta.dtype)
