"""reForge adapter (``Panchovix/stable-diffusion-webui-reForge``, ``main`` and ``dev``: the ``ldm_patched`` backend
with ComfyUI's newer sampling code).  What differs from Forge 2, read from reForge's source:

* the host's attention is ``ldm_patched.ldm.modules.attention.optimized_attention``, which takes the layer's
  ``attn_precision`` (in the patch's ``extra_options``); the batched model call is
  ``ldm_patched.modules.samplers.calc_cond_batch(model, [cond, uncond], x, sigma, model_options)``;
* its pre-CFG functions run *after* the model call, so the CFG stage drops the uncond rows in the single
  ``sampler_calc_cond_batch_function`` slot instead (chaining a function another extension put there);
* at CFG 1 (and under its skip-early-CFG/NGMS options) the post-CFG functions get ``uncond=None``; a conditioning
  modifier keeps the step's negative conds, so the methods see them as on Forge 2.

The session is in ``forge_family.py``."""

from __future__ import annotations

from typing import Any

from lib_attn.host import forge_family
from lib_attn.host.forge_family import Backend, ForgeSession, before_every_sampling, cleanup_model
from lib_attn.settings import Settings

__all__ = ["BACKEND", "before_every_sampling", "begin", "cleanup_model"]


class ReForge(Backend):
    def calc(self, model: Any, cond: Any, uncond: Any, x: Any, sigma: Any, model_options: dict) -> tuple:
        from ldm_patched.modules.samplers import calc_cond_batch

        return tuple(calc_cond_batch(model, [cond, uncond], x, sigma, model_options))

    def attention(self, q: Any, k: Any, v: Any, heads: int, extra_options: dict | None = None) -> Any:
        from ldm_patched.ldm.modules import attention

        precision = (extra_options or {}).get("attn_precision")
        return attention.optimized_attention(q, k, v, heads, attn_precision=precision)

    def install(self, clone: Any, session: ForgeSession, cfg: bool) -> None:
        def keep_uncond(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
            session.step_uncond = uncond
            return model, x, timestep, uncond, cond, cond_scale, model_options, seed

        clone.add_conditioning_modifier(keep_uncond)
        if not cfg:
            return
        previous = clone.model_options.get("sampler_calc_cond_batch_function")

        def calc_cond_batch_function(args: dict) -> Any:
            conds = list(args["conds"])
            if session.begin_step(conds[0], conds[1] is not None):
                conds[1] = None
            if previous is not None:
                return previous({**args, "conds": conds})
            from ldm_patched.modules.samplers import calc_cond_batch

            return calc_cond_batch(args["model"], conds, args["input"], args["sigma"], args["model_options"])

        clone.set_model_sampler_calc_cond_batch_function(calc_cond_batch_function)
        clone.set_model_sampler_cfg_function(session.cfg_function)

    def post_cfg_args(self, args: dict, session: ForgeSession) -> dict:
        if args.get("uncond") is None and session.step_uncond:
            return {**args, "uncond": session.step_uncond}
        return args


BACKEND = ReForge()


def begin(p: Any, settings: Settings) -> None:
    forge_family.begin(p, settings, BACKEND)
