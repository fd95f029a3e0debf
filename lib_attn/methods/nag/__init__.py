"""NAG, Normalized Attention Guidance (Chen et al., 2025): fields and per-pass plan."""

from __future__ import annotations

from typing import Any

from lib_attn.fields import Field, Section, hires_fields, interval
from lib_attn.methods.base import Method, PlanContext
from lib_attn.methods.nag.core import NagPlan

NAME = "nag"


class NagSection(Section):
    """A scale of 1 (the official "off") switches NAG off."""

    HIRES_VALUE = "scale"

    @property
    def active(self) -> bool:
        return self.enabled and (self.scale > 1 or (self.hires == "own" and self.hires_scale > 1))


FIELDS = (
    Field(
        NAME,
        "enabled",
        label="Enable NAG",
        infotext="NAG",
        kind="bool",
        default=False,
        help="Normalized Attention Guidance: the negative prompt acts inside the cross-attention layers, also at "
        "CFG 1 (Turbo, Lightning, Hyper, DMD2 checkpoints).",
    ),
    Field(
        NAME,
        "scale",
        label="NAG scale",
        infotext="NAG scale",
        kind="float",
        default=5.0,
        minimum=1.0,
        maximum=20.0,
        step=0.1,
        help="s in s*z+ - (s-1)*z- (the official nag_scale): how far the attention output moves away from the "
        "negative prompt. 1 switches NAG off.",
    ),
    Field(
        NAME,
        "tau",
        label="Tau (norm limit)",
        infotext="NAG tau",
        kind="float",
        default=2.5,
        minimum=1.0,
        maximum=10.0,
        step=0.1,
        help="The guided output's L1 norm per token is held below tau times the prompt's. Lower for many-step, "
        "high-CFG models; higher for few-step ones.",
    ),
    Field(
        NAME,
        "alpha",
        label="Alpha (blend)",
        infotext="NAG alpha",
        kind="float",
        default=0.25,
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        help="Share of the guided output in the result (the rest is the prompt's plain output).",
    ),
    *interval(NAME, "NAG", "NAG acts"),
    *hires_fields(NAME, "NAG", "scale", "NAG scale", 5.0, 20.0, minimum=1.0),
)


def plan(settings: Any, ctx: PlanContext) -> NagPlan | None:
    return NagPlan.build(settings.for_pass(ctx.is_hr_pass), ctx.available, METHOD.field("enabled"))


METHOD = Method(NAME, "NAG — Normalized Attention Guidance", FIELDS, plan, section=NagSection)
