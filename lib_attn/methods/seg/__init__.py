"""SEG, Smoothed Energy Guidance (Hong, NeurIPS 2024): fields and per-pass plan."""

from __future__ import annotations

from typing import Any

from lib_attn.fields import Field, ScaledSection, hires_fields, interval
from lib_attn.methods.base import Method, PlanContext
from lib_attn.methods.seg.core import SegPlan

NAME = "seg"

FIELDS = (
    Field(
        NAME,
        "enabled",
        label="Enable SEG",
        infotext="SEG",
        kind="bool",
        default=False,
        help="Smoothed Energy Guidance: steer away from a prediction whose self-attention queries are blurred.",
    ),
    Field(
        NAME,
        "scale",
        label="SEG scale",
        infotext="SEG scale",
        kind="float",
        default=3.0,
        minimum=0.0,
        maximum=30.0,
        step=0.1,
        help="Strength of the SEG term s in uncond + cfg*(cond-uncond) + s*(cond-blurred). 0 switches SEG off.",
    ),
    Field(
        NAME,
        "blur_sigma",
        label="Blur sigma (above 9999: infinite)",
        infotext="SEG blur sigma",
        kind="float",
        default=10000.0,
        minimum=0.0,
        help="Std of the Gaussian blur of the queries, in tokens. Above 9999 (the default) each query becomes its "
        "spatial mean (infinite blur); smaller values (1, 4, 16, ...) guide more gently. 0: no blur, no guidance.",
    ),
    *interval(NAME, "SEG", "SEG acts"),
    Field(
        NAME,
        "layers",
        label="Layers",
        infotext="SEG layers",
        kind="str",
        default="middle",
        help="Self-attention layers whose queries are blurred: comma-separated selectors such as middle, input.4, "
        "output.1.0, all.",
    ),
    *hires_fields(NAME, "SEG", "scale", "SEG scale", 3.0, 30.0),
)


def plan(settings: Any, ctx: PlanContext) -> SegPlan | None:
    with METHOD.selector():
        return SegPlan.build(settings.for_pass(ctx.is_hr_pass), ctx.available)


METHOD = Method(NAME, "SEG — Smoothed Energy Guidance", FIELDS, plan, section=ScaledSection)
