"""APG in the CFG stage (every host): the combination becomes APG's, per image, with one momentum state per part of
the prediction (FDG's bands, when FDG wraps it); the state starts afresh with each pass."""

from __future__ import annotations

from typing import Any

import torch

from lib_attn.cfg import CfgHooks, CfgStep
from lib_attn.methods.apg import METHOD
from lib_attn.methods.apg.core import apg
from lib_attn.ops import active_at


class Hooks(CfgHooks):
    method = METHOD

    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.running: dict[tuple, torch.Tensor] = {}

    def cfg(self, g: CfgStep) -> None:
        plan = self.plan
        if g.call == 0:
            self.running = {}  # a new pass (or batch): no momentum from the last one
        if plan is None or g.w <= 1 or not active_at(g.step, g.total, plan.start, plan.end):
            return

        def combine(c: torch.Tensor, u: torch.Tensor, w: float, key: tuple) -> torch.Tensor:
            prev = self.running.get(key)
            out, self.running[key] = apg(c, u, w, plan, prev if prev is not None and prev.shape == c.shape else None)
            return out

        g.combine = combine
