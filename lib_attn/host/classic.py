"""Forge Classic adapter (``Haoming02/sd-webui-forge-classic``, branch ``classic``; Forge 1.x has the same calls): the
old ``ldm_patched`` backend with Forge 2's CFG stage.  The host's attention is
``ldm_patched.ldm.modules.attention.optimized_attention(q, k, v, heads)`` and its batched model call
``ldm_patched.modules.samplers.calc_cond_uncond_batch``.  The session is in ``forge_family.py``."""

from __future__ import annotations

from typing import Any

from lib_attn.host import forge_family
from lib_attn.host.forge_family import Backend, before_every_sampling, cleanup_model
from lib_attn.settings import Settings

__all__ = ["BACKEND", "before_every_sampling", "begin", "cleanup_model"]


class Classic(Backend):
    def calc(self, model: Any, cond: Any, uncond: Any, x: Any, sigma: Any, model_options: dict) -> tuple:
        from ldm_patched.modules.samplers import calc_cond_uncond_batch

        return calc_cond_uncond_batch(model, cond, uncond, x, sigma, model_options)

    def attention(self, q: Any, k: Any, v: Any, heads: int, extra_options: dict | None = None) -> Any:
        from ldm_patched.ldm.modules import attention

        return attention.optimized_attention(q, k, v, heads)


BACKEND = Classic()


def begin(p: Any, settings: Settings) -> None:
    forge_family.begin(p, settings, BACKEND)
