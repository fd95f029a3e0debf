"""SAG, Self-Attention Guidance (Hong et al., ICCV 2023): fields and per-pass plan."""

from __future__ import annotations

from typing import Any

from lib_attn.fields import Field, ScaledSection, hires_fields, interval
from lib_attn.methods.base import Method, PlanContext
from lib_attn.methods.sag.core import SagPlan

NAME = "sag"

FIELDS = (
    Field(
        NAME,
        "enabled",
        label="Enable SAG",
        infotext="SAG",
        kind="bool",
        default=False,
        help="Self-Attention Guidance: steer away from a prediction whose most-attended regions were blurred.",
    ),
    Field(
        NAME,
        "scale",
        label="SAG scale",
        infotext="SAG scale",
        kind="float",
        default=0.75,
        minimum=0.0,
        maximum=5.0,
        step=0.01,
        help="Strength s of the SAG term s*(uncond - degraded) (cond - degraded without CFG). 0 switches SAG off.",
    ),
    Field(
        NAME,
        "blur_sigma",
        label="Blur sigma",
        infotext="SAG blur sigma",
        kind="float",
        default=1.0,
        minimum=0.0,
        maximum=10.0,
        step=0.01,
        help="Std of the Gaussian blur (9x9 kernel, in latent pixels) applied inside the attention mask.",
    ),
    Field(
        NAME,
        "threshold",
        label="Mask threshold",
        infotext="SAG threshold",
        kind="float",
        default=1.0,
        minimum=0.0,
        maximum=4.0,
        step=0.01,
        help="A token joins the mask when the attention it receives (summed over the queries, averaged over the "
        "heads) exceeds this. Lower: a larger blurred region.",
    ),
    *interval(NAME, "SAG", "SAG acts"),
    *hires_fields(NAME, "SAG", "scale", "SAG scale", 0.75, 5.0),
)


def plan(settings: Any, ctx: PlanContext) -> SagPlan | None:
    return SagPlan.build(settings.for_pass(ctx.is_hr_pass), ctx.available, METHOD.field("enabled"))


METHOD = Method(NAME, "SAG — Self-Attention Guidance", FIELDS, plan, section=ScaledSection)
