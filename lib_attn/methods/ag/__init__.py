"""AG, adaptive guidance (Castillo et al., AAAI 2025): fields and per-pass plan."""

from __future__ import annotations

from typing import Any

from lib_attn.fields import Field
from lib_attn.methods.ag.core import AgPlan
from lib_attn.methods.base import Method, PlanContext

NAME = "ag"

FIELDS = (
    Field(
        NAME,
        "enabled",
        label="Enable adaptive guidance",
        infotext="AG",
        kind="bool",
        default=False,
        help="Adaptive guidance: once the prompt's and the negative prompt's predictions agree, the rest of the pass "
        "skips the negative prompt (faster; the later steps run as at CFG 1). Acts where the CFG scale is above 1.",
    ),
    Field(
        NAME,
        "threshold",
        label="Similarity threshold",
        infotext="AG threshold",
        kind="float",
        default=0.99,
        minimum=0.9,
        maximum=1.0,
        step=0.0005,
        help="CFG stops once the cosine similarity of the two predictions reaches this for every image. Higher: "
        "later and fewer steps skipped.",
    ),
    Field(
        NAME,
        "earliest",
        label="Not before (fraction of steps)",
        infotext="AG earliest",
        kind="float",
        default=0.0,
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        help="CFG is kept at least up to this fraction of the pass's steps.",
    ),
    Field(
        NAME,
        "compare",
        label="Compare",
        infotext="AG compare",
        kind="choice",
        default="denoised",
        choices=("denoised", "noise"),
        help="What is compared: the denoised predictions (as ComfyUI's Adaptive Guidance node) or the noise "
        "predictions (the paper).",
    ),
)


def plan(settings: Any, ctx: PlanContext) -> AgPlan | None:
    if not settings.enabled:
        return None
    return AgPlan(settings.threshold, settings.earliest, settings.compare)


METHOD = Method(NAME, "AG — Adaptive Guidance", FIELDS, plan)
