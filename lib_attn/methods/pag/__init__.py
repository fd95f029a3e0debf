"""PAG, Perturbed-Attention Guidance (Ahn et al., ECCV 2024): fields and per-pass plan."""

from __future__ import annotations

from typing import Any

from lib_attn.fields import Field, ScaledSection, hires_fields, interval
from lib_attn.methods.base import Method, PlanContext
from lib_attn.methods.pag.core import PagPlan

NAME = "pag"


FIELDS = (
    Field(
        NAME,
        "enabled",
        label="Enable PAG",
        infotext="PAG",
        kind="bool",
        default=False,
        help="Perturbed-Attention Guidance: steer away from a prediction whose self-attention is replaced by the identity.",
    ),
    Field(
        NAME,
        "scale",
        label="PAG scale",
        infotext="PAG scale",
        kind="float",
        default=3.0,
        minimum=0.0,
        maximum=30.0,
        step=0.1,
        help="Strength of the PAG term s in uncond + cfg*(cond-uncond) + s*(cond-perturbed). 0 switches PAG off.",
    ),
    Field(
        NAME,
        "adaptive_scale",
        label="Adaptive scale",
        infotext="PAG adaptive scale",
        kind="float",
        default=0.0,
        minimum=0.0,
        maximum=1.0,
        step=0.001,
        help="diffusers' pag_adaptive_scale: the scale falls as s - a*(1000 - t) with the UNet timestep t, clipped at 0.",
    ),
    *interval(NAME, "PAG", "PAG acts"),
    Field(
        NAME,
        "layers",
        label="Layers",
        infotext="PAG layers",
        kind="str",
        default="middle",
        help="Self-attention layers to perturb: comma-separated selectors such as middle, input.4, output.1.0, all.",
    ),
    *hires_fields(NAME, "PAG", "scale", "PAG scale", 3.0, 30.0),
)


def plan(settings: Any, ctx: PlanContext) -> PagPlan | None:
    with METHOD.selector():
        return PagPlan.build(settings.for_pass(ctx.is_hr_pass), ctx.available)


METHOD = Method(NAME, "PAG — Perturbed-Attention Guidance", FIELDS, plan, section=ScaledSection)
