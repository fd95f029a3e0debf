"""PAG on A1111: B perturbed rows (copies of each image's first cond row) are inserted between the cond and the
uncond rows, so they ride in the same model call as cond and uncond; on the chosen self-attention layers those rows
take the identity attention map; after CFG ``s * (cond - perturbed)`` is added."""

from __future__ import annotations

from typing import Any

import torch

from lib_attn import batch as batchmod
from lib_attn.hooks import A1111Hooks
from lib_attn.methods.pag.core import identity_attention, pag_delta


def _put_rows(out: torch.Tensor, rows: list[int], values: torch.Tensor) -> torch.Tensor:
    out = out.clone()
    out[rows] = values
    return out


def _transforms_rows(fn: Any) -> bool:
    owner = getattr(fn, "__self__", None)
    return bool(getattr(fn, "transforms_rows", False) or getattr(owner, "transforms_rows", False))


class Hooks(A1111Hooks):
    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.scale = 0.0  # at the step in progress
        self.pert_out: torch.Tensor | None = None

    def install(self, plan: Any, unet: Any, patches: Any) -> None:
        if plan is None:
            return
        for key in plan.layers:
            module = unet.get_submodule(key.module_path)
            # a method further in that changes the rows' output (colorization) sees the whole call first
            inner = any(_transforms_rows(w.fn) for w in patches.wrappers_of(module))
            patches.wrap_forward(module, self._attn1_over if inner else self._attn1)

    def step_active(self) -> bool:
        ctx, plan = self.ctx, self.ctx.plan.pag
        self.scale, self.pert_out = 0.0, None
        if plan is not None:
            self.scale = plan.scale_at(ctx.step, ctx.total_steps, ctx.timestep())
        return self.scale > 0

    def rows(self, params: Any, layout: Any) -> tuple[list, list]:
        return ([("pag", list(range(layout.n_images)), {})] if self.scale > 0 else []), []

    def denoised(self, out: torch.Tensor) -> None:
        pag = self.ctx.st.layout.group("pag")
        if len(pag):
            self.pert_out = out[pag.start : pag.stop].clone()

    def after_cfg(self, params: Any, delta: torch.Tensor) -> torch.Tensor:
        if self.pert_out is None:
            return delta
        return delta + pag_delta(self.ctx.cond_out, self.pert_out, self.scale)

    def _span(self, n: int) -> tuple[int, int] | None:
        ctx = self.ctx
        if ctx.st is None or ctx.call is None or ctx.private:
            return None
        return batchmod.local_span(ctx.st.layout.group("pag"), ctx.call[0], ctx.call[1], n)

    def _attn1(self, module: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        x = args[0]
        n = int(x.shape[0])
        span = self._span(n)
        if span is None:
            return call_next(*args, **kwargs)
        a, b = span
        parts = []
        if a > 0:
            parts.append(self.ctx.sub_call(call_next, args, kwargs, n, 0, a))
        parts.append(identity_attention(module, x[a:b]))
        if b < n:
            parts.append(self.ctx.sub_call(call_next, args, kwargs, n, b, n))
        return torch.cat(parts, dim=0)

    def _attn1_over(self, module: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        """On a layer where a method further in changes the rows' output: that method runs on the whole call (it
        sees its capture rows before the rows it changes), then the PAG rows are replaced."""
        out = call_next(*args, **kwargs)
        span = self._span(int(args[0].shape[0]))
        if span is None:
            return out
        a, b = span
        return _put_rows(out, list(range(a, b)), identity_attention(module, args[0][a:b]).to(out.dtype))
