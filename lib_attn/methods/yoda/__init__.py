"""Attention-masked upscaling, YODA (Moser et al.): fields and per-pass plan."""

from __future__ import annotations

from typing import Any

from lib_attn.fields import Field
from lib_attn.layers import select
from lib_attn.methods.base import Method, PlanContext
from lib_attn.methods.edit_mask.core import default_selector
from lib_attn.methods.yoda import core

NAME = "yoda"
SOURCES = ("dino-vits8", "dino-vitb8", "unet")

FIELDS = (
    Field(
        NAME,
        "enabled",
        label="Enable masked upscaling",
        infotext="YODA",
        kind="bool",
        default=False,
        help="Spend the refinement where an attention map of the low-resolution image points first, and let the region grow over the steps to the whole image (YODA). txt2img: the hires-fix pass; img2img: every run.",
    ),
    Field(
        NAME,
        "source",
        label="Attention source",
        infotext="YODA source",
        kind="choice",
        default="dino-vits8",
        choices=SOURCES,
        help="dino-vits8 / dino-vitb8: DINO self-attention (the paper's; downloaded on first use into the WebUI's models/dino folder). unet: the checkpoint's own self-attention at the first step (no extra model).",
    ),
    Field(
        NAME,
        "start_coverage",
        label="Start coverage",
        infotext="YODA start coverage",
        kind="float",
        default=0.25,
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        help="Share of the image diffused at the first step (the most salient pixels); it grows to all of it at the last step.",
    ),
    Field(
        NAME,
        "growth",
        label="Growth curve",
        infotext="YODA growth",
        kind="float",
        default=1.0,
        minimum=0.2,
        maximum=5.0,
        step=0.05,
        help="Exponent of the coverage schedule c0 + (1 - c0) * progress^g: 1 linear, above 1 slow start (more steps on the salient area alone), below 1 fast start.",
    ),
    Field(
        NAME,
        "threshold",
        label="Threshold",
        infotext="YODA threshold",
        kind="float",
        default=1.0,
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        help="Pixels whose normalized attention is at least this are diffused from the first step, whatever the coverage. 1 = off.",
    ),
    Field(
        NAME,
        "blur",
        label="Mask blur (px)",
        infotext="YODA blur",
        kind="int",
        default=8,
        minimum=0,
        maximum=128,
        step=1,
        help="Feather of the mask edge: Gaussian sigma in image pixels. 0 = hard edge.",
    ),
    Field(
        NAME,
        "show",
        label="Return the mask preview",
        infotext="YODA show",
        kind="bool",
        default=False,
        help="Add one preview per image: the attention map and, beside it, the share of the steps each pixel was diffused (white = all).",
    ),
)


def plan(y: Any, ctx: PlanContext) -> core.YodaPlan | None:
    """Masked upscaling acts on the hires pass, and on the pass of an img2img generation."""
    if not y.enabled or not (ctx.is_hr_pass or ctx.img2img):
        return None
    source = "unet" if y.source == "unet" else "dino"
    available = list(ctx.available)
    layers = tuple(select(default_selector(available), available, attn="attn1")) if source == "unet" else ()
    if source == "unet" and not layers:
        raise METHOD.field("source").error("this model has no self-attention layers to take a map from")
    return core.YodaPlan(
        start_coverage=y.start_coverage,
        gamma=y.growth,
        threshold=None if y.threshold >= 1.0 else y.threshold,
        blur=y.blur / 8,
        source=source,
        layers=layers,
    )


def _run(p: Any, settings: Any, services: Any) -> Any:
    from lib_attn.methods.yoda.run import YodaRun

    return YodaRun.prepare(p, settings, services)


METHOD = Method(NAME, "Masked upscaling (YODA)", FIELDS, plan, run=_run)
