"""CFG-Zero* (Fan et al., 2025): fields and per-pass plan."""

from __future__ import annotations

from typing import Any

from lib_attn.fields import Field, interval
from lib_attn.methods.base import Method, PlanContext
from lib_attn.methods.cfg_zero.core import CfgZeroPlan

NAME = "cfg_zero"

FIELDS = (
    Field(
        NAME,
        "enabled",
        label="Enable CFG-Zero*",
        infotext="CFG-Zero",
        kind="bool",
        default=False,
        help="CFG-Zero*: the negative prompt's prediction is scaled to fit the prompt's before CFG, and the first "
        "step is zeroed. Costs nothing. Acts where the CFG scale is above 1.",
    ),
    Field(
        NAME,
        "zero_steps",
        label="Zero-init steps",
        infotext="CFG-Zero zero steps",
        kind="int",
        default=1,
        minimum=0,
        maximum=20,
        step=1,
        help="The first this many model evaluations of each pass predict no change (the paper's zero-init). 0: off.",
    ),
    Field(
        NAME,
        "zero_fraction",
        label="Zero-init fraction",
        infotext="CFG-Zero zero fraction",
        kind="float",
        default=0.0,
        minimum=0.0,
        maximum=0.5,
        step=0.01,
        help="Zero-init as a fraction of the pass's steps instead (the paper suggests about 0.04); the larger of the "
        "two counts.",
    ),
    *interval(NAME, "CFG-Zero", "The optimized scale acts"),
)


def plan(settings: Any, ctx: PlanContext) -> CfgZeroPlan | None:
    if not settings.enabled:
        return None
    return CfgZeroPlan(settings.zero_steps, settings.zero_fraction, settings.start, settings.end)


METHOD = Method(NAME, "CFG-Zero*", FIELDS, plan)
