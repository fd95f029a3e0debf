"""The CFG stage: how the cond and uncond predictions of a step are combined, shared by both host families.

A method that changes the combination itself (APG, CFG-Zero*, FDG) or skips the uncond pass (adaptive guidance) has
host-neutral hooks (:class:`CfgHooks`, in its folder's ``hooks.py``).  At each step where one of them is active, the
host adapter builds one :class:`CfgStep` from the step's predictions, calls every such method's ``cfg(g)`` in method
order, and puts ``g.result()`` where the host's own CFG result would have been.  The post-CFG terms of the other
methods (PAG, SEG, SAG, ...) are added after that.  Order: pre-CFG (uncond skipping), the CFG function, post-CFG.

Units: ``c``, ``u`` and the result are x0 predictions; ``x`` is the model input in k-diffusion units, so that
``x - d = sigma * eps`` for any x0 prediction ``d`` (A1111's timestep samplers are converted by the adapter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lib_attn.hooks import A1111Hooks, ForgeHooks

Tensor = torch.Tensor
Combine = Callable[[Tensor, Tensor, float, tuple], Tensor]


def plain_cfg(c: Tensor, u: Tensor, w: float, key: tuple = ()) -> Tensor:
    """Classifier-free guidance ``u + w * (c - u)``; ``key`` names the part of the prediction (FDG's bands)."""
    return u + (c - u) * w


@dataclass
class CfgStep:
    """One step's CFG stage (B rows, one per image).

    ``c``: the cond x0 prediction (with AND sub-prompts, ``u + sum_j k_j (c_j - u)``, so that plain CFG is
    ``u + w (c - u)``); ``u``: the uncond one, None where the uncond pass was skipped (the result is then ``c``);
    ``w``: the CFG scale; ``call``: the CFG denoiser's call index in this pass (0 at the first model evaluation);
    ``step``/``total``: the host's sampling step and the pass's steps (what every method's start/end reads).  ``combine`` is what turns (c, u, w) into the guided prediction: a method
    may replace it or wrap it (FDG calls the previous one per frequency band); ``override`` replaces the result.
    """

    x: Tensor
    c: Tensor
    u: Tensor | None
    w: float
    call: int
    step: int
    total: int
    combine: Combine = plain_cfg
    override: Tensor | None = None
    host_u: Tensor | None = field(default=None, init=False)  # u as the host computed it, before any method

    def __post_init__(self) -> None:
        self.host_u = self.u

    def result(self) -> Tensor:
        if self.override is not None:
            return self.override
        if self.u is None:
            return self.c
        return self.combine(self.c, self.u, self.w, ())


class CfgHooks(A1111Hooks, ForgeHooks):
    """Hooks of a method that acts in the CFG stage only: the same on every host.  Subclasses override
    :meth:`active`, :meth:`cfg` and, to save the uncond pass, :meth:`skip_uncond`."""

    cfg_stage = True
    method: Any = None  # the method's Method (its fields name errors)

    @property
    def enabled_field(self) -> Any:
        return self.method.field("enabled")

    @property
    def plan(self) -> Any:
        """This method's plan in the pass in progress (None: inactive)."""
        return self.ctx.plan.of(self.method.name) if self.ctx.plan is not None else None

    # the host events of both families that such a method leaves alone
    def begin_pass(self, plan: Any, new_pass: bool = True) -> None:
        self.new_pass()

    def install(self, plan: Any, *args: Any) -> dict:
        return {}

    def follow_up(self) -> contextlib.AbstractContextManager | None:
        return None

    def step_active(self) -> bool:
        return self.active()

    def new_pass(self) -> None:
        """A pass starts (reset state that lives for one pass: momentum, the AG switch)."""

    def active(self) -> bool:
        """Whether the method may act at the step in progress (``cfg`` reads the step's details)."""
        return self.plan is not None

    def cfg(self, g: CfgStep) -> None:
        """Change ``g``'s combination (``g.u``, ``g.combine``, ``g.override``)."""
