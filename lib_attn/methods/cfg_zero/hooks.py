"""CFG-Zero* in the CFG stage (every host): zero-init replaces the result with the model input; otherwise the
uncond prediction is rescaled by the optimized scale before the combination."""

from __future__ import annotations

from lib_attn.cfg import CfgHooks, CfgStep
from lib_attn.methods.cfg_zero import METHOD
from lib_attn.methods.cfg_zero.core import scaled_uncond
from lib_attn.ops import active_at


class Hooks(CfgHooks):
    method = METHOD

    def cfg(self, g: CfgStep) -> None:
        plan = self.plan
        if plan is None or g.w <= 1 or g.u is None:
            return
        if plan.zeroed(g.call, g.total):
            g.override = g.x.to(g.c.dtype)
        elif active_at(g.step, g.total, plan.start, plan.end):
            g.u = scaled_uncond(g.x.to(g.c.dtype), g.c, g.u)
