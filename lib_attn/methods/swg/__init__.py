"""SWG, sliding-window guidance (Kaiser et al., 2024): fields and per-pass plan."""

from __future__ import annotations

from typing import Any

from lib_attn.fields import Field, ScaledSection, hires_fields, interval
from lib_attn.methods.base import Method, PlanContext
from lib_attn.methods.swg.core import SwgPlan

NAME = "swg"


class SwgSection(ScaledSection):
    def check(self) -> None:
        super().check()
        if 0 < self.window < 64:
            raise self.FIELDS["window"].error(f"{self.window} is below the smallest window, 64 pixels (0: automatic)")


FIELDS = (
    Field(
        NAME,
        "enabled",
        label="Enable SWG",
        infotext="SWG",
        kind="bool",
        default=False,
        help="Sliding-window guidance: steer away from the prediction the model makes on overlapping crops of the "
        "image (it sees less context there): more coherent large images. One extra pass per window.",
    ),
    Field(
        NAME,
        "scale",
        label="SWG scale",
        infotext="SWG scale",
        kind="float",
        default=5.0,
        minimum=0.0,
        maximum=30.0,
        step=0.1,
        help="Strength s of the SWG term s*(cond - windows). 0 switches SWG off.",
    ),
    Field(
        NAME,
        "window",
        label="Window (pixels)",
        infotext="SWG window",
        kind="int",
        default=0,
        minimum=0,
        maximum=4096,
        step=64,
        help="Side of the square windows in pixels; 0: three quarters of each side of the image, in multiples of 64 "
        "(4 windows). Not larger than the image; multiples of 64 run exactly as the whole image does.",
    ),
    Field(
        NAME,
        "overlap",
        label="Least overlap (pixels)",
        infotext="SWG overlap",
        kind="int",
        default=128,
        minimum=0,
        maximum=2048,
        step=8,
        help="Neighbouring windows overlap at least this much (at most half a window); their predictions are blended "
        "across the overlap.",
    ),
    *interval(NAME, "SWG", "SWG acts"),
    *hires_fields(NAME, "SWG", "scale", "SWG scale", 5.0, 30.0),
)


def plan(settings: Any, ctx: PlanContext) -> SwgPlan | None:
    s = settings.for_pass(ctx.is_hr_pass)
    if not s.enabled or s.scale <= 0:
        return None
    return SwgPlan(s.scale, s.window, s.overlap, s.start, s.end)


METHOD = Method(NAME, "SWG — Sliding-Window Guidance", FIELDS, plan, section=SwgSection)
