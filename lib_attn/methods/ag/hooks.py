"""AG (every host): in the CFG stage it compares the host's cond and uncond predictions; once they agree, it asks
the host to skip the uncond pass for the rest of the pass (``skip_uncond``), and the CFG stage returns the cond
prediction.  Every other method then runs as it does at CFG 1."""

from __future__ import annotations

from typing import Any

from lib_attn.cfg import CfgHooks, CfgStep
from lib_attn.methods.ag import METHOD
from lib_attn.methods.ag.core import similarity
from lib_attn.ops import progress


class Hooks(CfgHooks):
    method = METHOD

    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.off_from: int | None = None  # the call index from which the pass skips the uncond pass

    def skip_uncond(self) -> bool:
        if self.plan is None or self.ctx.call_index == 0:
            self.off_from = None  # a new pass decides afresh
            return False
        return self.off_from is not None and self.ctx.call_index >= self.off_from

    def cfg(self, g: CfgStep) -> None:
        plan = self.plan
        if plan is None or g.host_u is None or g.w <= 1 or self.off_from is not None:
            return
        if progress(g.step, g.total) < plan.earliest:
            return
        if float(similarity(g.x.to(g.c.dtype), g.c, g.host_u, plan.compare).min()) >= plan.threshold:
            self.off_from = g.call + 1
