"""SEG on the Forge family: after CFG, one more call on the cond rows whose chosen self-attention layers attend with
blurred queries (:class:`lib_attn.guided.PerturbedCall`)."""

from __future__ import annotations

from typing import Any

from lib_attn.guided import PerturbedCall
from lib_attn.methods.seg import METHOD
from lib_attn.methods.seg.core import blur_queries, token_grid


class Hooks(PerturbedCall):
    NAME = "seg"

    def replace(self, plan: Any) -> Any:
        attention, field = self.ctx.attention, METHOD.field("layers")

        def seg_patch(q: Any, k: Any, v: Any, extra_options: dict) -> Any:
            shape = extra_options["original_shape"]
            hw = token_grid(int(q.shape[1]), (int(shape[-2]), int(shape[-1])), field)
            return attention(blur_queries(q, hw, plan.blur_sigma), k, v, int(extra_options["n_heads"]), extra_options)

        return seg_patch
