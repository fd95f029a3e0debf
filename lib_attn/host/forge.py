"""Forge 2.x adapter (``backend/``; also Forge Neo and reForge's Forge-2-based branch ``newmain_newforge``): the host's
attention is ``backend.attention.attention_function``, its batched model call
``backend.sampling.sampling_function.calc_cond_uncond_batch``; the CFG stage is :class:`Backend`'s.  The session is
in ``forge_family.py``."""

from __future__ import annotations

from typing import Any

from lib_attn.host import forge_family
from lib_attn.host.forge_family import Backend, ForgeSession, before_every_sampling, cleanup_model
from lib_attn.settings import Settings

__all__ = ["BACKEND", "ForgeSession", "before_every_sampling", "begin", "cleanup_model"]


class Forge2(Backend):
    def calc(self, model: Any, cond: Any, uncond: Any, x: Any, sigma: Any, model_options: dict) -> tuple:
        from backend.sampling.sampling_function import calc_cond_uncond_batch

        return calc_cond_uncond_batch(model, cond, uncond, x, sigma, model_options)

    def attention(self, q: Any, k: Any, v: Any, heads: int, extra_options: dict | None = None) -> Any:
        from backend.attention import attention_function

        return attention_function(q, k, v, heads)


BACKEND = Forge2()


def begin(p: Any, settings: Settings) -> None:
    forge_family.begin(p, settings, BACKEND)
