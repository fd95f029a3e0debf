"""TPG on the Forge family: after CFG, one more call on the cond rows (:class:`lib_attn.guided.PerturbedCall`, with
no attention replaced) in which each chosen transformer block first shuffles its input tokens."""

from __future__ import annotations

from typing import Any

from lib_attn.guided import PerturbedCall
from lib_attn.hooks import with_transformer_option
from lib_attn.methods.tpg.core import block_path, permutation, seed_of, shuffle_tokens

SHUFFLE = (
    "attn_toolkit_tpg"  # transformer option of TPG's call (not MODE: the other methods act in it as in the cond call)
)


class Hooks(PerturbedCall):
    NAME = "tpg"

    def perturbed_options(self, plan: Any, model_options: dict) -> dict:
        return with_transformer_option(model_options, SHUFFLE, True)

    def install(self, plan: Any) -> dict:
        if plan is None:
            return {}
        return {"block_input": {block_path(k.module_path): self._shuffle for k in plan.layers}}

    def _shuffle(self, x: Any, transformer_options: dict) -> Any:
        if not transformer_options.get(SHUFFLE):
            return x
        return shuffle_tokens(x, permutation(seed_of(self.ctx.p), self.ctx.call_index, int(x.shape[1])))
