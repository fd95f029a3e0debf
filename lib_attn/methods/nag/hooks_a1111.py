"""NAG on A1111: a wrapper on every cross-attention layer replaces the output of the rows conditioned on the prompt
(the cond rows and the inserted rows that copy them) with ``to_out`` of the NAG output against the negative prompt
of the row's image (the step's uncond conditioning, which A1111 always makes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lib_attn.hooks import A1111Hooks
from lib_attn.methods.nag.core import nag_attention


class Hooks(A1111Hooks):
    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.on = False
        self.negative: torch.Tensor | None = None  # (B, T, C): each image's negative prompt

    def install(self, plan: Any, unet: Any, patches: Any) -> None:
        if plan is not None:
            for key in plan.layers:
                patches.wrap_forward(unet.get_submodule(key.module_path), self._attn2)

    def step_active(self) -> bool:
        plan = self.ctx.plan.nag
        self.on = plan is not None and plan.active_at(self.ctx.step, self.ctx.total_steps)
        return self.on

    def prepare(self, params: Any, layout: Any) -> None:
        uc = params.text_uncond
        self.negative = uc["crossattn"] if isinstance(uc, Mapping) else uc

    def _attn2(self, module: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        out = call_next(*args, **kwargs)
        ctx = self.ctx
        if not self.on or ctx.st is None or ctx.call is None or ctx.private or self.negative is None:
            return out
        x = args[0]
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        start, n = ctx.call
        if context is None or int(x.shape[0]) != n:
            return out  # not a cross-attention call on the call's rows
        prompt = ctx.st.layout.prompt_rows()
        local = [r - start for r in range(start, start + n) if r in prompt]
        if not local:
            return out
        images = [prompt[start + r] for r in local]
        xr, cr, neg = x[local], context[local], self.negative[images].to(context)
        z = nag_attention(
            module.to_q(xr),
            module.to_k(cr),
            module.to_v(cr),
            module.to_k(neg),
            module.to_v(neg),
            module.heads,
            ctx.plan.nag,
        )
        out = out.clone()
        out[local] = module.to_out(z).to(out.dtype)
        return out
