"""APG, Adaptive Projected Guidance (Sadat et al., ICLR 2025): fields and per-pass plan."""

from __future__ import annotations

from typing import Any

from lib_attn.fields import Field, interval
from lib_attn.methods.apg.core import ApgPlan
from lib_attn.methods.base import Method, PlanContext

NAME = "apg"

FIELDS = (
    Field(
        NAME,
        "enabled",
        label="Enable APG",
        infotext="APG",
        kind="bool",
        default=False,
        help="Adaptive Projected Guidance: CFG without the oversaturation of high scales. Replaces how the prompt and "
        "the negative prompt combine; costs nothing. Acts where the CFG scale is above 1.",
    ),
    Field(
        NAME,
        "eta",
        label="Eta (parallel share)",
        infotext="APG eta",
        kind="float",
        default=0.0,
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        help="Share of the guidance parallel to the prediction that is kept (the part that oversaturates). 0 as the "
        "paper recommends; 1 with the other settings at 0 is plain CFG.",
    ),
    Field(
        NAME,
        "norm_threshold",
        label="Norm threshold",
        infotext="APG norm threshold",
        kind="float",
        default=15.0,
        minimum=0.0,
        maximum=50.0,
        step=0.5,
        help="The guidance (cond - uncond, per image) is scaled down to at most this norm. 0: no cap.",
    ),
    Field(
        NAME,
        "momentum",
        label="Momentum",
        infotext="APG momentum",
        kind="float",
        default=-0.5,
        minimum=-1.0,
        maximum=1.0,
        step=0.05,
        help="Each step's guidance adds this times the previous steps' running guidance. Negative (the paper: -0.5) "
        "pushes away from what was already applied. 0: off.",
    ),
    *interval(NAME, "APG", "APG acts"),
)


def plan(settings: Any, ctx: PlanContext) -> ApgPlan | None:
    if not settings.enabled:
        return None
    return ApgPlan(settings.eta, settings.norm_threshold, settings.momentum, settings.start, settings.end)


METHOD = Method(NAME, "APG — Adaptive Projected Guidance", FIELDS, plan)
