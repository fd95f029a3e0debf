"""NAG on the Forge family: an ``attn2`` replace patch on every cross-attention layer gives the cond chunks (Forge's
``cond_or_uncond`` 0, also in another method's extra cond call) the NAG output against each image's negative prompt.
The negative comes from the step's uncond conditioning; where Forge made none (CFG 1) the hook makes it once per
pass, as the host would."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lib_attn.hooks import MODE, ForgeHooks
from lib_attn.layers import LayerKey
from lib_attn.methods.nag.core import nag_attention


class Hooks(ForgeHooks):
    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.on = False
        self.negative: torch.Tensor | None = None
        self.made: dict[bool, Any] = {}  # is_hr_pass -> the negative conditioning the hook made (CFG 1)

    def install(self, plan: Any) -> dict:
        return {"attn2": [k.forge_key for k in plan.layers]} if plan is not None else {}

    def on_denoiser(self, params: Any) -> None:
        ctx, plan = self.ctx, self.ctx.plan.nag
        self.on = plan is not None and plan.active_at(ctx.step, ctx.total_steps)
        if not self.on:
            return
        uc = params.text_uncond
        if uc is None:  # Forge at CFG 1 (hires: hr_cfg 1) skips the negative prompt
            hr = bool(getattr(ctx.p, "is_hr_pass", False))
            if hr not in self.made:
                self.made[hr] = ctx.services.negative_conditioning(ctx.p, hr)
            uc = ctx.services.conditioning_at(self.made[hr], int(getattr(params.denoiser, "step", ctx.step)))
        self.negative = uc["crossattn"] if isinstance(uc, Mapping) else uc

    def attn2(self, key: tuple, q: Any, k: Any, v: Any, extra_options: dict) -> Any:
        flags = list(extra_options.get("cond_or_uncond") or [])
        if not self.on or self.negative is None or extra_options.get(MODE) is not None or 0 not in flags:
            return None
        heads = int(extra_options["n_heads"])
        module = self.ctx.unet.get_submodule(LayerKey(*key, "attn2").module_path)
        neg = self.negative.to(q)
        k_neg, v_neg = module.to_k(neg), module.to_v(neg)
        chunk = q.shape[0] // len(flags)
        parts = []
        for i, flag in enumerate(flags):
            rows = slice(i * chunk, (i + 1) * chunk)
            if flag == 0 and chunk == neg.shape[0]:
                parts.append(nag_attention(q[rows], k[rows], v[rows], k_neg, v_neg, heads, self.ctx.plan.nag))
            else:
                parts.append(self.ctx.attention(q[rows], k[rows], v[rows], heads, extra_options))
        return torch.cat(parts)
