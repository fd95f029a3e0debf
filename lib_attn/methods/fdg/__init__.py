"""FDG, frequency-decoupled guidance (Sadat et al., 2025): fields and per-pass plan."""

from __future__ import annotations

from typing import Any

from lib_attn.fields import Field, Section, interval
from lib_attn.methods.base import Method, PlanContext
from lib_attn.methods.fdg.core import FdgPlan, parse_scales

NAME = "fdg"


class FdgSection(Section):
    def check(self) -> None:
        super().check()
        try:
            parse_scales(self.scales, self.levels)
        except ValueError as e:
            raise self.FIELDS["scales"].error(str(e)) from None


FIELDS = (
    Field(
        NAME,
        "enabled",
        label="Enable FDG",
        infotext="FDG",
        kind="bool",
        default=False,
        help="Frequency-decoupled guidance: fine detail gets the full CFG scale, the coarse layout and colours a "
        "lower one (less oversaturation at high CFG). Costs nothing. Acts where the CFG scale is above 1.",
    ),
    Field(
        NAME,
        "levels",
        label="Bands",
        infotext="FDG levels",
        kind="int",
        default=2,
        minimum=2,
        maximum=5,
        step=1,
        help="Frequency bands (Laplacian pyramid levels). 2 as in the paper.",
    ),
    Field(
        NAME,
        "low_share",
        label="Coarsest band's share of CFG",
        infotext="FDG low share",
        kind="float",
        default=0.5,
        minimum=0.0,
        maximum=1.0,
        step=0.05,
        help="The coarsest band's scale is max(1, CFG x this); the finest band's is the CFG scale; bands between are "
        "linear.",
    ),
    Field(
        NAME,
        "scales",
        label="Band scales",
        infotext="FDG scales",
        kind="str",
        default="",
        help="Optional scales per band, finest first, comma-separated, e.g. '10, 5'. An empty entry keeps that "
        "band's default.",
    ),
    *interval(NAME, "FDG", "FDG acts"),
)


def plan(settings: Any, ctx: PlanContext) -> FdgPlan | None:
    if not settings.enabled:
        return None
    overrides = parse_scales(settings.scales, settings.levels)
    return FdgPlan(settings.levels, settings.low_share, overrides, settings.start, settings.end)


METHOD = Method(NAME, "FDG — Frequency-Decoupled Guidance", FIELDS, plan, section=FdgSection)
