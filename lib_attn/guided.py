"""Guidance from a perturbed copy of the cond prediction (PAG, SEG): its plan and its hooks on both host families.

A method of this kind perturbs the chosen self-attention layers of a copy of the cond rows and adds
``s * (cond - perturbed)`` after CFG.  It says how the layers are perturbed:

* A1111 (:class:`PerturbedRows`): ``perturb(module, x)``, the layer output of the perturbed rows from their hidden
  states.  B perturbed rows (copies of each image's first cond row, a group named after the method) ride in the
  step's model call between the cond and the uncond rows.
* Forge family (:class:`PerturbedCall`): ``replace(plan)``, an ``attn1`` replace patch for one more call on the cond
  rows after CFG (also where Forge skips the uncond rows: CFG 1, hires ``hr_cfg`` 1).

Each method has its own rows (its own extra call on Forge): two such methods on together cost two extra row sets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lib_attn import batch as batchmod
from lib_attn.hooks import A1111Hooks, ForgeHooks, with_attn1_replace
from lib_attn.layers import LayerKey, select
from lib_attn.ops import active_at

Tensor = torch.Tensor


def adaptive_scale(scale: float, adaptive: float, timestep: float) -> float:
    """diffusers' ``pag_adaptive_scale``: ``max(0, scale - adaptive * (1000 - t))``."""
    if adaptive <= 0:
        return scale
    return max(0.0, scale - adaptive * (1000.0 - float(timestep)))


def guidance_delta(cond: Tensor, perturbed: Tensor, scale: float) -> Tensor:
    """The guidance term ``s * (cond - perturbed)``; shapes (B, C, H, W)."""
    return (cond - perturbed) * scale


@dataclass(frozen=True)
class PerturbedPlan:
    """A perturbed-copy guidance for one sampling pass (hires override already applied)."""

    scale: float
    start: float
    end: float
    layers: tuple[LayerKey, ...]
    adaptive_scale: float = 0.0

    @classmethod
    def build(cls, settings: Any, available: Sequence[LayerKey], **extra: Any) -> Any:
        """None when off for this pass.  Raises LayerSelectorError for a bad selector."""
        if not settings.enabled or settings.scale <= 0:
            return None
        layers = tuple(select(settings.layers, available, attn="attn1"))
        return cls(settings.scale, settings.start, settings.end, layers, **extra)

    def scale_at(self, step: int, total: int, timestep: float | None) -> float:
        """Effective scale at a step (0 outside the interval or once the adaptive scale hits 0)."""
        if not active_at(step, total, self.start, self.end):
            return 0.0
        if timestep is None or self.adaptive_scale <= 0:
            return self.scale
        return adaptive_scale(self.scale, self.adaptive_scale, timestep)


def _put_rows(out: Tensor, rows: list[int], values: Tensor) -> Tensor:
    out = out.clone()
    out[rows] = values
    return out


def _transforms_rows(fn: Any) -> bool:
    owner = getattr(fn, "__self__", None)
    return bool(getattr(fn, "transforms_rows", False) or getattr(owner, "transforms_rows", False))


class PerturbedRows(A1111Hooks):
    """A1111: the method's perturbed rows in the step's call; ``NAME`` is the method (its plan and its row group)."""

    NAME = ""

    def __init__(self, ctx: Any, run: Any = None):
        super().__init__(ctx, run)
        self.scale = 0.0  # at the step in progress
        self.pert_out: Tensor | None = None

    def perturb(self, module: Any, x: Tensor) -> Tensor:
        """The perturbed output of self-attention ``module`` for hidden states ``x`` (B, N, C)."""
        raise NotImplementedError

    def install(self, plan: Any, unet: Any, patches: Any) -> None:
        if plan is None:
            return
        for key in plan.layers:
            module = unet.get_submodule(key.module_path)
            # a method further in that changes the rows' output (colorization) sees the whole call first
            inner = any(_transforms_rows(w.fn) for w in patches.wrappers_of(module))
            patches.wrap_forward(module, self._attn1_over if inner else self._attn1)

    def step_active(self) -> bool:
        ctx, plan = self.ctx, self.ctx.plan.of(self.NAME)
        self.scale, self.pert_out = 0.0, None
        if plan is not None:
            self.scale = plan.scale_at(ctx.step, ctx.total_steps, ctx.timestep())
        return self.scale > 0

    def rows(self, params: Any, layout: Any) -> tuple[list, list]:
        return ([(self.NAME, list(range(layout.n_images)), {})] if self.scale > 0 else []), []

    def denoised(self, out: Tensor) -> None:
        rows = self.ctx.st.layout.group(self.NAME)
        if len(rows):
            self.pert_out = out[rows.start : rows.stop].clone()

    def after_cfg(self, params: Any, delta: Tensor) -> Tensor:
        if self.pert_out is None:
            return delta
        return delta + guidance_delta(self.ctx.cond_out, self.pert_out, self.scale)

    def _span(self, n: int) -> tuple[int, int] | None:
        ctx = self.ctx
        if ctx.st is None or ctx.call is None or ctx.private:
            return None
        return batchmod.local_span(ctx.st.layout.group(self.NAME), ctx.call[0], ctx.call[1], n)

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
        parts.append(self.perturb(module, x[a:b]))
        if b < n:
            parts.append(self.ctx.sub_call(call_next, args, kwargs, n, b, n))
        return torch.cat(parts, dim=0)

    def _attn1_over(self, module: Any, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        """On a layer where a method further in changes the rows' output: that method runs on the whole call (it
        sees its capture rows before the rows it changes), then the perturbed rows are replaced."""
        out = call_next(*args, **kwargs)
        span = self._span(int(args[0].shape[0]))
        if span is None:
            return out
        a, b = span
        return _put_rows(out, list(range(a, b)), self.perturb(module, args[0][a:b]).to(out.dtype))


def forge_timestep(model: Any, sigma: Tensor) -> float | None:
    """The model timestep of ``sigma`` on the Forge family (for the adaptive scale)."""
    for owner in ("predictor", "model_sampling"):
        obj = getattr(model, owner, None)
        if obj is not None and hasattr(obj, "timestep"):
            return float(obj.timestep(sigma[:1])[0])
    return None


class PerturbedCall(ForgeHooks):
    """Forge family: after CFG, one more call on the cond rows with ``replace(plan)`` as the ``attn1`` patch of the
    chosen layers (in a copy of the model options), then ``denoised + s * (cond - perturbed)``."""

    NAME = ""

    def replace(self, plan: Any) -> Callable[..., Tensor]:
        """The ``attn1`` replace patch ``(q, k, v, extra_options) -> out`` of the perturbed call."""
        raise NotImplementedError

    def perturbed_options(self, plan: Any, model_options: dict) -> dict:
        """The model options of the perturbed call (a copy): by default ``replace(plan)`` on the plan's layers."""
        return with_attn1_replace(model_options, self.replace(plan), [k.forge_key for k in plan.layers])

    def post_cfg(self, args: dict, denoised: Tensor) -> Tensor:
        plan, ctx = self.ctx.plan.of(self.NAME), self.ctx
        if plan is None:
            return denoised
        model, sigma = args["model"], args["sigma"]
        scale = plan.scale_at(ctx.step, ctx.total_steps, forge_timestep(model, sigma))
        if scale <= 0:
            return denoised
        options = self.perturbed_options(plan, args["model_options"])
        perturbed, _ = ctx.calc(model, args["cond"], None, args["input"], sigma, options)
        return denoised + guidance_delta(args["cond_denoised"], perturbed, scale)
