"""Reference colorization (Kosugi): fields and per-pass plan."""

from __future__ import annotations

from typing import Any

from lib_attn.fields import Field, Section, interval
from lib_attn.methods.base import Method, PlanContext
from lib_attn.methods.colorize import core

NAME = "colorize"


class ColorizeSection(Section):
    def check(self) -> None:
        super().check()
        if self.enabled and not self.reference:
            raise self.FIELDS["reference"].error("reference colorization is on but no colour reference was given")


FIELDS = (
    Field(
        NAME,
        "enabled",
        label="Enable reference colorization",
        infotext="Colorize",
        kind="bool",
        default=False,
        help="img2img: the init image (turned to grayscale) takes its colours from the colour reference through the UNet's self-attention; the output keeps the init image's lightness exactly.",
    ),
    Field(
        NAME,
        "reference",
        label="Colour reference",
        infotext="Colorize reference",
        kind="image",
        default=(),
        help="The image whose colours are transferred. API: base64 PNG/JPEG or a data URL, or a list with one per image of the batch.",
    ),
    Field(
        NAME,
        "strength",
        label="Transfer strength",
        infotext="Colorize strength",
        kind="float",
        default=1.0,
        minimum=0.0,
        maximum=1.0,
        step=0.05,
        help="Share of the transferred attention output in the chosen layers (1 = the paper's full transfer, 0 = plain attention).",
    ),
    Field(
        NAME,
        "guidance",
        label="Colorization guidance",
        infotext="Colorize guidance",
        kind="float",
        default=10.0,
        minimum=1.0,
        maximum=30.0,
        step=0.5,
        help="w in plain + w*(transferred - plain), the paper's classifier-free colorization guidance (10). 1 = plain transfer, and saves the extra rows.",
    ),
    *interval(NAME, "Colorize", "Colour transfer acts"),
    Field(
        NAME,
        "layers",
        label="Layers",
        infotext="Colorize layers",
        kind="str",
        default="auto",
        help="Self-attention layers that take the reference colours: auto (the paper's decoder layers: SD1/SD2 output.6-11, SDXL output.3-5) or selectors such as output.9, output.10.0.",
    ),
    Field(
        NAME,
        "gamma_fine",
        label="Gray matching, finest layers (γ1)",
        infotext="Colorize gamma1",
        kind="float",
        default=0.5,
        minimum=0.0,
        maximum=1.0,
        step=0.05,
        help="Weight of the gray-to-gray match against the colour-to-colour match in the highest-resolution chosen layers (paper: 0.5).",
    ),
    Field(
        NAME,
        "beta_fine",
        label="Keep input attention, finest layers (β1)",
        infotext="Colorize beta1",
        kind="float",
        default=0.5,
        minimum=0.0,
        maximum=1.0,
        step=0.05,
        help="Share of the input's own self-attention kept in the highest-resolution chosen layers (paper: 0.5).",
    ),
    Field(
        NAME,
        "gamma_coarse",
        label="Gray matching, other layers (γ2)",
        infotext="Colorize gamma2",
        kind="float",
        default=1.0,
        minimum=0.0,
        maximum=1.0,
        step=0.05,
        help="The same weight in the other chosen layers (paper: 1).",
    ),
    Field(
        NAME,
        "beta_coarse",
        label="Keep input attention, other layers (β2)",
        infotext="Colorize beta2",
        kind="float",
        default=0.0,
        minimum=0.0,
        maximum=1.0,
        step=0.05,
        help="The same share in the other chosen layers (paper: 0).",
    ),
    Field(
        NAME,
        "adain",
        label="Start from reference statistics (AdaIN)",
        infotext="Colorize AdaIN",
        kind="bool",
        default=True,
        help="Match the start latent's per-channel mean and std to the reference's, as the paper does.",
    ),
    Field(
        NAME,
        "match_colors",
        label="Match reference colour statistics",
        infotext="Colorize match colors",
        kind="bool",
        default=True,
        help="Match the output's a/b mean and std to the reference's before the init image's lightness is put back (the paper's post-processing).",
    ),
    Field(
        NAME,
        "paper",
        label="Paper's regime (DDIM inversion, 5 steps, repeated passes)",
        infotext="Colorize paper",
        kind="bool",
        default=False,
        help="Run the official regime instead of the img2img sampling: the gray input and the references DDIM-inverted to t = 121 (sigma 0.39), 5 deterministic steps from there at CFG 1, and the whole pass repeated (the output, recombined with the input's lightness, inverted again). The sampler, steps, denoising strength and CFG scale are not used; the reference streams run at full size.",
    ),
    Field(
        NAME,
        "passes",
        label="Passes (paper's regime)",
        infotext="Colorize passes",
        kind="int",
        default=3,
        minimum=1,
        maximum=5,
        step=1,
        help="How often the paper's regime repeats its inversion and 5 steps (paper: 3).",
    ),
    Field(
        NAME,
        "reference_scale",
        label="Reference streams' resolution",
        infotext="Colorize reference scale",
        kind="float",
        default=0.5,
        minimum=0.25,
        maximum=1.0,
        step=0.05,
        help="Side of the two reference streams (colour and gray) as a share of the generation size, rounded to 64 px: their keys and values need not have the input's token count. 0.5 costs a quarter of 1 (the official code's full size).",
    ),
)


def plan(c: Any, ctx: PlanContext) -> core.ColorizePlan | None:
    if not c.enabled or ctx.is_hr_pass:
        return None
    with METHOD.selector():
        return core.build_plan(
            guidance_scale=c.guidance,
            strength=c.strength,
            start=c.start,
            end=c.end,
            selector=c.layers,
            available=list(ctx.available),
            widths=ctx.widths or dict.fromkeys(ctx.available, 0),
            fine=core.LayerParams(c.gamma_fine, c.beta_fine),
            coarse=core.LayerParams(c.gamma_coarse, c.beta_coarse),
            paper=c.paper,
        )


def _run(p: Any, settings: Any, services: Any) -> Any:
    from lib_attn.methods.colorize.run import ColorizeInputs

    return ColorizeInputs.prepare(p, settings)


METHOD = Method(NAME, "Reference colorization", FIELDS, plan, section=ColorizeSection, tabs=("img2img",), run=_run)
