"""Style reference via Attention Distillation (Zhou et al., CVPR 2025): fields and per-pass plan."""

from __future__ import annotations

from typing import Any

from lib_attn.fields import HIRES_MODES, Field, Section, interval
from lib_attn.methods.base import Method, PlanContext
from lib_attn.methods.style import core

NAME = "style"


class StyleSection(Section):
    HIRES_VALUE = "strength"

    def check(self) -> None:
        super().check()
        if self.enabled and not self.reference:
            raise self.FIELDS["reference"].error("style reference is on but no style image was given")

    @property
    def active(self) -> bool:
        if self.enabled and self.mode == "transfer":
            return self.transfer_lr > 0
        return super().active


FIELDS = (
    Field(
        NAME,
        "enabled",
        label="Enable style reference",
        infotext="Style",
        kind="bool",
        default=False,
        help="Attention Distillation: at each guided step, gradient steps on the latent pull the decoder's self-attention towards the style image's keys and values.",
    ),
    Field(
        NAME,
        "reference",
        label="Style image",
        infotext="Style reference",
        kind="image",
        default=(),
        help="The image whose style (textures, colours, strokes) is distilled. API: base64 PNG/JPEG or a data URL, or a list of several (see 'Several style images').",
    ),
    Field(
        NAME,
        "pairing",
        label="Several style images",
        infotext="Style pairing",
        kind="choice",
        default="all",
        choices=("all", "each"),
        help="all (the paper's): every image attends to all style images at once (their keys and values concatenated). each: style image i for image i of the batch (one per image).",
    ),
    Field(
        NAME,
        "mode",
        label="Mode",
        infotext="Style mode",
        kind="choice",
        default="guidance",
        choices=("guidance", "transfer"),
        help="guidance: AD-guided sampling (txt2img, img2img, hires fix; the paper's text-to-image mode). transfer (img2img): the paper's style transfer by optimization: the init image's latent itself is optimized, one Adam step per sampling step (paper: 200 steps, denoising strength 1), against the style loss plus the content loss; the sampler only sets the step count.",
    ),
    Field(
        NAME,
        "transfer_lr",
        label="Transfer learning rate",
        infotext="Style transfer lr",
        kind="float",
        default=0.05,
        minimum=0.0,
        maximum=0.5,
        step=0.005,
        help="Mode transfer: Adam's learning rate on the latent (paper: 0.05). 0 switches the transfer off.",
    ),
    Field(
        NAME,
        "strength",
        label="Strength",
        infotext="Style strength",
        kind="float",
        default=0.04,
        minimum=0.0,
        maximum=1.0,
        step=0.001,
        help="Adam learning rate of the inner gradient steps on the VP-scaled latent, in the official code's units (it uses 0.015 with 3 steps; the default 0.04 with 1 step moves the latent as far per step). 0 switches the guidance off.",
    ),
    Field(
        NAME,
        "iters",
        label="Gradient steps per step",
        infotext="Style iters",
        kind="int",
        default=1,
        minimum=1,
        maximum=10,
        step=1,
        help="Inner iterations (forward + backward through the UNet) per guided denoising step (official: 3 for SD1.5, 2 for SDXL). The first reuses the WebUI's own negative-prompt pass; each further one costs a forward and a backward more.",
    ),
    *interval(NAME, "Style", "The style guidance acts"),
    Field(
        NAME,
        "layers",
        label="Layers",
        infotext="Style layers",
        kind="str",
        default="auto",
        help="Self-attention layers of the loss: auto (the paper's: SD1/SD2 output.6-11, SDXL output.3-5) or selectors such as output.9, output.10.0.",
    ),
    Field(
        NAME,
        "content_weight",
        label="Content preservation (img2img)",
        infotext="Style content weight",
        kind="float",
        default=0.25,
        minimum=0.0,
        maximum=5.0,
        step=0.05,
        help="img2img: weight of the content loss (the init image's queries kept; paper 0.25). txt2img ignores it.",
    ),
    Field(
        NAME,
        "adain",
        label="Match reference statistics (AdaIN)",
        infotext="Style AdaIN",
        kind="bool",
        default=True,
        help="At guided steps, match per-channel mean and std to the style image's (the official text-to-image default); 'AdaIN on' says what is matched.",
    ),
    Field(
        NAME,
        "adain_mode",
        label="AdaIN on",
        infotext="Style AdaIN on",
        kind="choice",
        default="noisy",
        choices=("noisy", "denoised"),
        help="noisy (the paper's): the latent being sampled takes the statistics of the style latent noised to the same level. denoised: the step's denoised prediction takes the clean style latent's.",
    ),
    Field(
        NAME,
        "temperature",
        label="Attention temperature (τ)",
        infotext="Style temperature",
        kind="float",
        default=1.0,
        minimum=0.1,
        maximum=4.0,
        step=0.05,
        help="Scale of the queries in the target attention on the style image (official attn_scale, 1).",
    ),
    Field(
        NAME,
        "checkpointing",
        label="Gradient checkpointing",
        infotext="Style checkpointing",
        kind="choice",
        default="auto",
        choices=("auto", "on", "off"),
        help="Recompute UNet blocks in the backward pass instead of keeping their activations: less memory, about a third more time. auto: on for SDXL.",
    ),
    Field(
        NAME,
        "hires",
        label="Hires pass",
        infotext="Style hires",
        kind="choice",
        default="off",
        choices=HIRES_MODES,
        help="In the hires-fix pass: same settings as the first pass, an own strength, or off (default: the first pass sets the style, the hires pass only refines).",
    ),
    Field(
        NAME,
        "hires_strength",
        label="Hires strength",
        infotext="Style hires strength",
        kind="float",
        default=0.01,
        minimum=0.0,
        maximum=1.0,
        step=0.001,
        help="Strength used in the hires-fix pass when 'Hires pass' is 'own'.",
    ),
)


def plan(settings: Any, ctx: PlanContext) -> core.StylePlan | None:
    st = settings.for_pass(ctx.is_hr_pass)
    if not st.enabled:
        return None
    with METHOD.selector():
        return core.build_plan(
            strength=st.strength,
            iters=st.iters,
            start=st.start,
            end=st.end,
            selector=st.layers,
            available=list(ctx.available),
            tau=st.temperature,
            content_weight=st.content_weight,
            adain=st.adain,
            checkpoint=st.checkpointing,
            adain_mode=st.adain_mode,
            transfer_lr=st.transfer_lr if st.mode == "transfer" else None,
        )


def _run(p: Any, settings: Any, services: Any) -> Any:
    from lib_attn.methods.style.run import StyleInputs

    return StyleInputs.prepare(p, settings)


METHOD = Method(NAME, "Style reference (Attention Distillation)", FIELDS, plan, section=StyleSection, run=_run)
