"""TPG on A1111: its own B perturbed rows in the step's call (:class:`lib_attn.guided.PerturbedRows`); a wrapper on
each chosen transformer block shuffles those rows' tokens before the block runs."""

from __future__ import annotations

from typing import Any

from lib_attn.guided import PerturbedRows
from lib_attn.methods.tpg.core import block_path, permutation, seed_of, shuffle_tokens


class Hooks(PerturbedRows):
    NAME = "tpg"

    def install(self, plan: Any, unet: Any, patches: Any) -> None:
        if plan is None:
            return
        for path in dict.fromkeys(block_path(k.module_path) for k in plan.layers):
            patches.wrap_forward(unet.get_submodule(path), self._block)

    def _block(self, module: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        x = args[0]
        span = self._span(int(x.shape[0]))
        if span is None:
            return call_next(*args, **kwargs)
        a, b = span
        perm = permutation(seed_of(self.ctx.p), self.ctx.call_index, int(x.shape[1]))
        x = x.clone()
        x[a:b] = shuffle_tokens(x[a:b], perm)
        return call_next(x, *args[1:], **kwargs)
