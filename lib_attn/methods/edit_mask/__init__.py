"""Automatic edit masks from cross-attention, InstDiffEdit (Zou et al., AAAI 2024): fields and per-pass plan."""

from __future__ import annotations

from typing import Any

from lib_attn.fields import Field, Section
from lib_attn.methods.base import Method, PlanContext
from lib_attn.methods.edit_mask import core

NAME = "edit_mask"


class EditMaskSection(Section):
    def check(self) -> None:
        super().check()
        if self.other_similarity > self.object_similarity:
            raise self.FIELDS["other_similarity"].error(
                f"{self.other_similarity:g} must not be above the object word similarity ({self.object_similarity:g})"
            )

    @property
    def word_list(self) -> tuple[str, ...]:
        return tuple(w.strip().lower() for w in self.words.replace(";", ",").split(",") if w.strip())


FIELDS = (
    Field(
        NAME,
        "enabled",
        label="Enable automatic edit mask",
        infotext="Edit mask",
        kind="bool",
        default=False,
        help="img2img: the prompt is the edit; a mask built from the prompt's cross-attention keeps the init image outside it at every step (no painted mask needed).",
    ),
    Field(
        NAME,
        "words",
        label="Mask words",
        infotext="Edit mask words",
        kind="str",
        default="",
        help="Words of the prompt whose attention makes the mask (comma separated). Empty: chosen automatically (the paper's adaptive aggregation).",
    ),
    Field(
        NAME,
        "threshold",
        label="Mask threshold",
        infotext="Edit mask threshold",
        kind="float",
        default=0.2,
        minimum=0.0,
        maximum=0.99,
        step=0.01,
        help="Binarization threshold of the normalized attention map (paper: 0.2 benchmark, 0.3 samples). Higher: a smaller mask.",
    ),
    Field(
        NAME,
        "grow",
        label="Grow mask (px)",
        infotext="Edit mask grow",
        kind="int",
        default=8,
        minimum=0,
        maximum=256,
        step=1,
        help="Dilate the mask by this many image pixels (rounded to the 8-pixel latent grid).",
    ),
    Field(
        NAME,
        "blur",
        label="Mask blur (px)",
        infotext="Edit mask blur",
        kind="int",
        default=4,
        minimum=0,
        maximum=128,
        step=1,
        help="Feather the mask edge: Gaussian sigma in image pixels. 0 = hard edge.",
    ),
    Field(
        NAME,
        "layers",
        label="Layers",
        infotext="Edit mask layers",
        kind="str",
        default="auto",
        help="Cross-attention layers whose maps are used: auto (the paper's lowest-resolution encoder and decoder layers: SD1/SD2 input.7-8, output.3-5; SDXL input.7-8, output.0-2) or selectors.",
    ),
    Field(
        NAME,
        "object_similarity",
        label="Object word similarity",
        infotext="Edit mask object similarity",
        kind="float",
        default=0.9,
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        help="Words whose map is at least this cosine-similar to the anchor word's are part of the object (0.9).",
    ),
    Field(
        NAME,
        "other_similarity",
        label="Other word similarity",
        infotext="Edit mask other similarity",
        kind="float",
        default=0.6,
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        help="Words at most this similar to the anchor are 'other' and their map is subtracted (0.6).",
    ),
    Field(
        NAME,
        "batch_average",
        label="One mask for the batch",
        infotext="Edit mask batch average",
        kind="bool",
        default=False,
        help="Average the maps of all images of the batch into one mask (the paper averages three seeds of one image). Off: each image gets its own mask.",
    ),
    Field(
        NAME,
        "seeds",
        label="Seeds (noise draws)",
        infotext="Edit mask seeds",
        kind="int",
        default=1,
        minimum=1,
        maximum=3,
        step=1,
        help="Average each image's maps over this many noise draws of its input (the paper's 3); each extra draw adds one conditional UNet row per image and step. 1: the sampler's own noise only.",
    ),
    Field(
        NAME,
        "show",
        label="Return the mask",
        infotext="Edit mask show",
        kind="bool",
        default=True,
        help="Add each image's mask (white = edited) to the results, in the UI gallery and the API's images.",
    ),
    Field(
        NAME,
        "final",
        label="Final pass",
        infotext="Edit mask final",
        kind="choice",
        default="blend",
        choices=("blend", "inpaint"),
        help="blend: the edited latent is the result. inpaint: then one more img2img inpainting pass over the init image with the final mask and the same prompt, steps and strength (the paper's fallback; best with an inpainting checkpoint).",
    ),
    Field(
        NAME,
        "inpaint_model",
        label="Inpainting checkpoint (final pass)",
        infotext="Edit mask inpaint model",
        kind="str",
        default="",
        options="checkpoints",
        help="Final pass inpaint: re-render each image with this checkpoint (an inpainting one, as the paper's pipeline) at full strength inside the mask, over the init image; the WebUI switches to it and back. Empty: the loaded model at the generation's strength.",
    ),
)


def plan(e: Any, ctx: PlanContext) -> core.EditMaskPlan | None:
    if not e.enabled or ctx.is_hr_pass:
        return None
    with METHOD.selector():
        return core.build_plan(
            selector=e.layers,
            available=list(ctx.available),
            threshold=e.threshold,
            object_sim=e.object_similarity,
            other_sim=e.other_similarity,
            grow=round(e.grow / 8),
            blur=e.blur / 8,
            batch_average=e.batch_average,
            seeds=e.seeds,
        )


def _run(p: Any, settings: Any, services: Any) -> Any:
    from lib_attn.methods.edit_mask.run import EditMaskRun

    return EditMaskRun.prepare(p, settings, services)


METHOD = Method(
    NAME, "Automatic edit mask (InstDiffEdit)", FIELDS, plan, section=EditMaskSection, tabs=("img2img",), run=_run
)
