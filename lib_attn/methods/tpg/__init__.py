"""TPG, Token Perturbation Guidance (Rajabi et al., NeurIPS 2025): fields and per-pass plan."""

from __future__ import annotations

from typing import Any

from lib_attn.fields import Field, ScaledSection, hires_fields, interval
from lib_attn.methods.base import Method, PlanContext
from lib_attn.methods.tpg.core import TpgPlan

NAME = "tpg"

FIELDS = (
    Field(
        NAME,
        "enabled",
        label="Enable TPG",
        infotext="TPG",
        kind="bool",
        default=False,
        help="Token Perturbation Guidance: steer away from a prediction whose tokens were shuffled at the input of "
        "the chosen transformer blocks. One extra cond pass, as PAG.",
    ),
    Field(
        NAME,
        "scale",
        label="TPG scale",
        infotext="TPG scale",
        kind="float",
        default=3.0,
        minimum=0.0,
        maximum=20.0,
        step=0.1,
        help="Strength s of the TPG term s*(cond - shuffled). 0 switches TPG off.",
    ),
    *interval(NAME, "TPG", "TPG acts"),
    Field(
        NAME,
        "layers",
        label="Blocks",
        infotext="TPG layers",
        kind="str",
        default="input.7, input.8",
        help="Transformer blocks whose input tokens are shuffled, named like the layers elsewhere: input.7 (every "
        "block of input_blocks.7), input.7.2, middle, output.1.0. The authors' SDXL choice is blocks 2 to 9 of "
        "input.7 plus input.8 (input.7.2, ..., input.7.9, input.8).",
    ),
    *hires_fields(NAME, "TPG", "scale", "TPG scale", 3.0, 20.0),
)


def plan(settings: Any, ctx: PlanContext) -> TpgPlan | None:
    with METHOD.selector():
        return TpgPlan.build(settings.for_pass(ctx.is_hr_pass), ctx.available)


METHOD = Method(NAME, "TPG — Token Perturbation Guidance", FIELDS, plan, section=ScaledSection)
