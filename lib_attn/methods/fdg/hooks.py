"""FDG in the CFG stage (every host): the combination in force (plain CFG, or APG's) runs once per frequency band
with the band's scale."""

from __future__ import annotations

from lib_attn.cfg import CfgHooks, CfgStep
from lib_attn.methods.fdg import METHOD
from lib_attn.methods.fdg.core import fdg, min_side
from lib_attn.ops import active_at


class Hooks(CfgHooks):
    method = METHOD

    def cfg(self, g: CfgStep) -> None:
        plan = self.plan
        if plan is None or g.w <= 1 or not active_at(g.step, g.total, plan.start, plan.end):
            return
        if min(g.c.shape[-2:]) < min_side(plan.levels):
            side = min_side(plan.levels)
            self.ctx.fail(
                METHOD.field("levels").error(
                    f"{plan.levels} bands need a latent of at least {side}x{side} ({side * 8}x{side * 8} pixels); "
                    f"this one is {g.c.shape[-2]}x{g.c.shape[-1]}"
                )
            )
            return
        inner, scales = g.combine, plan.scales(g.w)
        g.combine = lambda c, u, w, key: fdg(c, u, scales, lambda a, b, s, k: inner(a, b, s, key + k))
