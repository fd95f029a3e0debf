"""PAG on the Forge family: after CFG, one more call on the cond rows with an identity attention map on the chosen
layers, then ``denoised + s * (cond - perturbed)`` (:class:`lib_attn.guided.PerturbedCall`).  It also runs where
Forge skips the uncond rows (CFG 1, hires ``hr_cfg`` 1), where ``denoised`` is the cond."""

from __future__ import annotations

from typing import Any

from lib_attn.guided import PerturbedCall


def identity_attention(q: Any, k: Any, v: Any, extra_options: Any = None, **kwargs: Any) -> Any:
    """attn1 replace patch: the identity attention map gives every token its own value."""
    return v


class Hooks(PerturbedCall):
    NAME = "pag"

    def replace(self, plan: Any) -> Any:
        return identity_attention
