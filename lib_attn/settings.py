"""One table of parameters that drives UI order, API names, infotext keys and XYZ axes.

Every parameter of every method is a :class:`Field`.  ``FIELDS`` (in order) is the
positional argument list of the script (UI and ``alwayson_scripts[...]["args"]``).
The API also takes a *named* form as its first argument::

    {"alwayson_scripts": {"Attention Toolkit": {"args": [{"pag": {"scale": 3.0, "layers": "middle"}}]}}}

A section named in the named form is switched on unless it says ``"enabled": false``.
Flat names (``{"pag_scale": 3.0}``) are accepted too.  Anything that does not parse raises
:class:`SettingsError`, whose message names the field.

This module is pure Python: no torch, no gradio, no WebUI.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TITLE = "Attention Toolkit"
XYZ_PREFIX = "[Attention] "
OVERRIDE_ATTR = "attn_toolkit_overrides"  # dict on `p`, filled by XYZ axes and read by the script

HIRES_MODES = ("same", "own", "off")
YODA_SOURCES = ("dino-vits8", "dino-vitb8", "unet")


class SettingsError(ValueError):
    """A parameter did not parse.  ``field`` is the API name (``pag.scale``), ``label`` the UI label."""

    def __init__(self, field: str, label: str, message: str):
        self.field = field
        self.label = label
        super().__init__(f"{TITLE}: {label} ({field}): {message}")


@dataclass(frozen=True)
class Field:
    section: str  # method section, e.g. "pag"
    name: str  # name inside the section, e.g. "scale"
    label: str  # UI label
    infotext: str  # infotext key
    kind: str  # "bool" | "float" | "int" | "str" | "choice"
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""

    @property
    def key(self) -> str:
        """Flat name, used for the dataclass attribute, ``p`` overrides and flat API names."""
        return f"{self.section}_{self.name}"

    @property
    def api_name(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def elem_id(self) -> str:
        return f"attn_toolkit_{self.key}"

    def parse(self, value: Any) -> Any:
        """Convert a raw UI/API/infotext value, or raise :class:`SettingsError` naming this field."""
        try:
            return _PARSERS[self.kind](self, value)
        except SettingsError:
            raise
        except (TypeError, ValueError) as e:
            raise SettingsError(self.api_name, self.label, str(e)) from None

    def format(self, value: Any) -> str:
        """Infotext text for a value; :meth:`parse` reads it back."""
        if self.kind == "bool":
            return "True" if value else "False"
        if self.kind == "float":
            return f"{value:.10g}"  # ten digits: what an API caller types survives the round trip
        if self.kind == "image":
            return image_digest(value)
        return str(value)

    def error(self, message: str) -> SettingsError:
        return SettingsError(self.api_name, self.label, message)


def image_digest(images: Any) -> str:
    """Short content hash of the images (what infotext records of a reference image)."""
    import hashlib

    h = hashlib.sha256()
    for img in images or ():
        h.update(repr((img.mode, img.size)).encode())
        h.update(img.tobytes())
    return h.hexdigest()[:10] if images else ""


def _parse_bool(f: Field, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return v.strip().lower() in ("true", "1", "yes", "on")
    raise f.error(f"expected true or false, got {v!r}")


def _parse_number(f: Field, v: Any) -> float:
    if isinstance(v, bool) or v is None:
        raise f.error(f"expected a number, got {v!r}")
    try:
        x = float(v.strip()) if isinstance(v, str) else float(v)
    except (TypeError, ValueError):
        raise f.error(f"expected a number, got {v!r}") from None
    if not math.isfinite(x):
        raise f.error(f"expected a finite number, got {v!r}")
    if (f.minimum is not None and x < f.minimum) or (f.maximum is not None and x > f.maximum):
        raise f.error(f"{x:g} is out of range [{f.minimum:g}, {f.maximum:g}]")
    return x


def _parse_int(f: Field, v: Any) -> int:
    x = _parse_number(f, v)
    if x != int(x):
        raise f.error(f"expected a whole number, got {v!r}")
    return int(x)


def _parse_str(f: Field, v: Any) -> str:
    if v is None:
        return f.default
    if not isinstance(v, str):
        raise f.error(f"expected text, got {type(v).__name__}")
    return v.strip()


def _parse_choice(f: Field, v: Any) -> str:
    if not isinstance(v, str):
        raise f.error(f"expected one of {', '.join(f.choices or ())}, got {v!r}")
    s = v.strip().lower()
    if s not in (f.choices or ()):
        raise f.error(f"expected one of {', '.join(f.choices or ())}, got {v!r}")
    return s


def _parse_image(f: Field, v: Any) -> tuple:
    """A tuple of RGB PIL images (one for all images of a batch, or one per image); () when empty."""
    from lib_attn.images import load_image  # PIL / numpy only when an image is given

    if v is None:
        return ()
    items = list(v) if isinstance(v, (list, tuple)) else [v]
    out = []
    for i, item in enumerate(items):
        try:
            img = load_image(f, item)
        except SettingsError as e:
            if len(items) > 1:
                raise f.error(f"image {i}: {str(e).split(': ', 2)[-1]}") from None
            raise
        if img is not None:
            out.append(img)
    return tuple(out)


_PARSERS = {
    "image": _parse_image,
    "bool": _parse_bool,
    "float": _parse_number,
    "int": _parse_int,
    "str": _parse_str,
    "choice": _parse_choice,
}


def _interval(section: str, prefix: str, who: str) -> tuple[Field, Field]:
    """The start/end pair every method has: its active interval as a fraction of the pass's steps."""
    return (
        Field(
            section,
            "start",
            "Start (fraction of steps)",
            f"{prefix} start",
            "float",
            0.0,
            0.0,
            1.0,
            0.01,
            help=f"{who} from this fraction of the sampling steps...",
        ),
        Field(
            section,
            "end",
            "End (fraction of steps)",
            f"{prefix} end",
            "float",
            1.0,
            0.0,
            1.0,
            0.01,
            help="...up to this fraction of the sampling steps (inclusive).",
        ),
    )


# --------------------------------------------------------------------------------------------
# The table.  Order = positional order of the script's args; never reorder, only append.
# --------------------------------------------------------------------------------------------
FIELDS: tuple[Field, ...] = (
    Field(
        "pag",
        "enabled",
        "Enable PAG",
        "PAG",
        "bool",
        False,
        help="Perturbed-Attention Guidance: steer away from a prediction whose self-attention is replaced by the identity.",
    ),
    Field(
        "pag",
        "scale",
        "PAG scale",
        "PAG scale",
        "float",
        3.0,
        0.0,
        30.0,
        0.1,
        help="Strength of the PAG term s in uncond + cfg*(cond-uncond) + s*(cond-perturbed). 0 switches PAG off.",
    ),
    Field(
        "pag",
        "adaptive_scale",
        "Adaptive scale",
        "PAG adaptive scale",
        "float",
        0.0,
        0.0,
        1.0,
        0.001,
        help="diffusers' pag_adaptive_scale: the scale falls as s - a*(1000 - t) with the UNet timestep t, clipped at 0.",
    ),
    *_interval("pag", "PAG", "PAG acts"),
    Field(
        "pag",
        "layers",
        "Layers",
        "PAG layers",
        "str",
        "middle",
        help="Self-attention layers to perturb: comma-separated selectors such as middle, input.4, output.1.0, all.",
    ),
    Field(
        "pag",
        "hires",
        "Hires pass",
        "PAG hires",
        "choice",
        "same",
        choices=HIRES_MODES,
        help="In the hires-fix pass: same settings as the first pass, an own scale, or off.",
    ),
    Field(
        "pag",
        "hires_scale",
        "Hires PAG scale",
        "PAG hires scale",
        "float",
        3.0,
        0.0,
        30.0,
        0.1,
        help="PAG scale used in the hires-fix pass when 'Hires pass' is 'own'.",
    ),
    # ---- reference colorization (img2img) ----
    Field(
        "colorize",
        "enabled",
        "Enable reference colorization",
        "Colorize",
        "bool",
        False,
        help="img2img: the init image (turned to grayscale) takes its colours from the colour reference through "
        "the UNet's self-attention; the output keeps the init image's lightness exactly.",
    ),
    Field(
        "colorize",
        "reference",
        "Colour reference",
        "Colorize reference",
        "image",
        (),
        help="The image whose colours are transferred. API: base64 PNG/JPEG or a data URL, or a list with one "
        "per image of the batch.",
    ),
    Field(
        "colorize",
        "strength",
        "Transfer strength",
        "Colorize strength",
        "float",
        1.0,
        0.0,
        1.0,
        0.05,
        help="Share of the transferred attention output in the chosen layers (1 = the paper's full transfer, "
        "0 = plain attention).",
    ),
    Field(
        "colorize",
        "guidance",
        "Colorization guidance",
        "Colorize guidance",
        "float",
        10.0,
        1.0,
        30.0,
        0.5,
        help="w in plain + w*(transferred - plain), the paper's classifier-free colorization guidance (10). "
        "1 = plain transfer, and saves the extra rows.",
    ),
    *_interval("colorize", "Colorize", "Colour transfer acts"),
    Field(
        "colorize",
        "layers",
        "Layers",
        "Colorize layers",
        "str",
        "auto",
        help="Self-attention layers that take the reference colours: auto (the paper's decoder layers: SD1/SD2 "
        "output.6-11, SDXL output.3-5) or selectors such as output.9, output.10.0.",
    ),
    Field(
        "colorize",
        "gamma_fine",
        "Gray matching, finest layers (γ1)",
        "Colorize gamma1",
        "float",
        0.5,
        0.0,
        1.0,
        0.05,
        help="Weight of the gray-to-gray match against the colour-to-colour match in the highest-resolution "
        "chosen layers (paper: 0.5).",
    ),
    Field(
        "colorize",
        "beta_fine",
        "Keep input attention, finest layers (β1)",
        "Colorize beta1",
        "float",
        0.5,
        0.0,
        1.0,
        0.05,
        help="Share of the input's own self-attention kept in the highest-resolution chosen layers (paper: 0.5).",
    ),
    Field(
        "colorize",
        "gamma_coarse",
        "Gray matching, other layers (γ2)",
        "Colorize gamma2",
        "float",
        1.0,
        0.0,
        1.0,
        0.05,
        help="The same weight in the other chosen layers (paper: 1).",
    ),
    Field(
        "colorize",
        "beta_coarse",
        "Keep input attention, other layers (β2)",
        "Colorize beta2",
        "float",
        0.0,
        0.0,
        1.0,
        0.05,
        help="The same share in the other chosen layers (paper: 0).",
    ),
    Field(
        "colorize",
        "adain",
        "Start from reference statistics (AdaIN)",
        "Colorize AdaIN",
        "bool",
        True,
        help="Match the start latent's per-channel mean and std to the reference's, as the paper does.",
    ),
    Field(
        "colorize",
        "match_colors",
        "Match reference colour statistics",
        "Colorize match colors",
        "bool",
        True,
        help="Match the output's a/b mean and std to the reference's before the init image's lightness is put "
        "back (the paper's post-processing).",
    ),
    # ---- style reference (Attention Distillation) ----
    Field(
        "style",
        "enabled",
        "Enable style reference",
        "Style",
        "bool",
        False,
        help="Attention Distillation: at each guided step, gradient steps on the latent pull the decoder's "
        "self-attention towards the style image's keys and values.",
    ),
    Field(
        "style",
        "reference",
        "Style image",
        "Style reference",
        "image",
        (),
        help="The image whose style (textures, colours, strokes) is distilled. API: base64 PNG/JPEG or a data URL, "
        "or a list with one per image of the batch.",
    ),
    Field(
        "style",
        "strength",
        "Strength",
        "Style strength",
        "float",
        0.2,
        0.0,
        1.0,
        0.005,
        help="Adam learning rate of the inner gradient steps; their displacement moves the denoised prediction. "
        "0 switches the guidance off. With more gradient steps per step, a lower strength moves as far.",
    ),
    Field(
        "style",
        "iters",
        "Gradient steps per step",
        "Style iters",
        "int",
        1,
        1,
        10,
        1,
        help="Inner iterations (forward + backward through the UNet) per guided denoising step (official: 3 for "
        "SD1.5, 2 for SDXL). The first reuses the WebUI's own negative-prompt pass; each further one costs a "
        "forward and a backward more.",
    ),
    *_interval("style", "Style", "The style guidance acts"),
    Field(
        "style",
        "layers",
        "Layers",
        "Style layers",
        "str",
        "auto",
        help="Self-attention layers of the loss: auto (the paper's: SD1/SD2 output.6-11, SDXL output.3-5) or "
        "selectors such as output.9, output.10.0.",
    ),
    Field(
        "style",
        "content_weight",
        "Content preservation (img2img)",
        "Style content weight",
        "float",
        0.25,
        0.0,
        5.0,
        0.05,
        help="img2img: weight of the content loss (the init image's queries kept; paper 0.25). txt2img ignores it.",
    ),
    Field(
        "style",
        "adain",
        "Match reference statistics (AdaIN)",
        "Style AdaIN",
        "bool",
        True,
        help="At guided steps, match the denoised latent's per-channel mean and std to the style image's "
        "(the official text-to-image default).",
    ),
    Field(
        "style",
        "temperature",
        "Attention temperature (τ)",
        "Style temperature",
        "float",
        1.0,
        0.1,
        4.0,
        0.05,
        help="Scale of the queries in the target attention on the style image (official attn_scale, 1).",
    ),
    Field(
        "style",
        "checkpointing",
        "Gradient checkpointing",
        "Style checkpointing",
        "choice",
        "auto",
        choices=("auto", "on", "off"),
        help="Recompute UNet blocks in the backward pass instead of keeping their activations: less memory, "
        "about a third more time. auto: on for SDXL.",
    ),
    Field(
        "style",
        "hires",
        "Hires pass",
        "Style hires",
        "choice",
        "off",
        choices=HIRES_MODES,
        help="In the hires-fix pass: same settings as the first pass, an own strength, or off (default: the "
        "first pass sets the style, the hires pass only refines).",
    ),
    Field(
        "style",
        "hires_strength",
        "Hires strength",
        "Style hires strength",
        "float",
        0.05,
        0.0,
        1.0,
        0.005,
        help="Strength used in the hires-fix pass when 'Hires pass' is 'own'.",
    ),
    # ---- automatic edit mask (InstDiffEdit, img2img) ----
    Field(
        "edit_mask",
        "enabled",
        "Enable automatic edit mask",
        "Edit mask",
        "bool",
        False,
        help="img2img: the prompt is the edit; a mask built from the prompt's cross-attention keeps the init "
        "image outside it at every step (no painted mask needed).",
    ),
    Field(
        "edit_mask",
        "words",
        "Mask words",
        "Edit mask words",
        "str",
        "",
        help="Words of the prompt whose attention makes the mask (comma separated). Empty: chosen automatically "
        "(the paper's adaptive aggregation).",
    ),
    Field(
        "edit_mask",
        "threshold",
        "Mask threshold",
        "Edit mask threshold",
        "float",
        0.2,
        0.0,
        0.99,
        0.01,
        help="Binarization threshold of the normalized attention map (paper: 0.2 benchmark, 0.3 samples). "
        "Higher: a smaller mask.",
    ),
    Field(
        "edit_mask",
        "grow",
        "Grow mask (px)",
        "Edit mask grow",
        "int",
        8,
        0,
        256,
        1,
        help="Dilate the mask by this many image pixels (rounded to the 8-pixel latent grid).",
    ),
    Field(
        "edit_mask",
        "blur",
        "Mask blur (px)",
        "Edit mask blur",
        "int",
        4,
        0,
        128,
        1,
        help="Feather the mask edge: Gaussian sigma in image pixels. 0 = hard edge.",
    ),
    Field(
        "edit_mask",
        "layers",
        "Layers",
        "Edit mask layers",
        "str",
        "auto",
        help="Cross-attention layers whose maps are used: auto (the paper's lowest-resolution encoder and decoder "
        "layers: SD1/SD2 input.7-8, output.3-5; SDXL input.7-8, output.0-2) or selectors.",
    ),
    Field(
        "edit_mask",
        "object_similarity",
        "Object word similarity",
        "Edit mask object similarity",
        "float",
        0.9,
        0.0,
        1.0,
        0.01,
        help="Words whose map is at least this cosine-similar to the anchor word's are part of the object (0.9).",
    ),
    Field(
        "edit_mask",
        "other_similarity",
        "Other word similarity",
        "Edit mask other similarity",
        "float",
        0.6,
        0.0,
        1.0,
        0.01,
        help="Words at most this similar to the anchor are 'other' and their map is subtracted (0.6).",
    ),
    Field(
        "edit_mask",
        "batch_average",
        "One mask for the batch",
        "Edit mask batch average",
        "bool",
        False,
        help="Average the maps of all images of the batch into one mask (the paper averages three seeds of one "
        "image). Off: each image gets its own mask.",
    ),
    Field(
        "edit_mask",
        "show",
        "Return the mask",
        "Edit mask show",
        "bool",
        True,
        help="Add each image's mask (white = edited) to the results, in the UI gallery and the API's images.",
    ),
    Field(
        "edit_mask",
        "final",
        "Final pass",
        "Edit mask final",
        "choice",
        "blend",
        choices=("blend", "inpaint"),
        help="blend: the edited latent is the result. inpaint: then one more img2img inpainting pass over the "
        "init image with the final mask and the same prompt, steps and strength (the paper's fallback; best with "
        "an inpainting checkpoint).",
    ),
    # ---- attention-masked upscaling (YODA; img2img and the hires-fix pass) ----
    Field(
        "yoda",
        "enabled",
        "Enable masked upscaling",
        "YODA",
        "bool",
        False,
        help="Spend the refinement where an attention map of the low-resolution image points first, and let the "
        "region grow over the steps to the whole image (YODA). txt2img: the hires-fix pass; img2img: every run.",
    ),
    Field(
        "yoda",
        "source",
        "Attention source",
        "YODA source",
        "choice",
        "dino-vits8",
        choices=YODA_SOURCES,
        help="dino-vits8 / dino-vitb8: DINO self-attention (the paper's; downloaded on first use into the WebUI's "
        "models/dino folder). unet: the checkpoint's own self-attention at the first step (no extra model).",
    ),
    Field(
        "yoda",
        "start_coverage",
        "Start coverage",
        "YODA start coverage",
        "float",
        0.25,
        0.0,
        1.0,
        0.01,
        help="Share of the image diffused at the first step (the most salient pixels); it grows to all of it at "
        "the last step.",
    ),
    Field(
        "yoda",
        "growth",
        "Growth curve",
        "YODA growth",
        "float",
        1.0,
        0.2,
        5.0,
        0.05,
        help="Exponent of the coverage schedule c0 + (1 - c0) * progress^g: 1 linear, above 1 slow start (more steps "
        "on the salient area alone), below 1 fast start.",
    ),
    Field(
        "yoda",
        "threshold",
        "Threshold",
        "YODA threshold",
        "float",
        1.0,
        0.0,
        1.0,
        0.01,
        help="Pixels whose normalized attention is at least this are diffused from the first step, whatever the "
        "coverage. 1 = off.",
    ),
    Field(
        "yoda",
        "blur",
        "Mask blur (px)",
        "YODA blur",
        "int",
        8,
        0,
        128,
        1,
        help="Feather of the mask edge: Gaussian sigma in image pixels. 0 = hard edge.",
    ),
    Field(
        "yoda",
        "show",
        "Return the mask preview",
        "YODA show",
        "bool",
        False,
        help="Add one preview per image: the attention map and, beside it, the share of the steps each pixel was "
        "diffused (white = all).",
    ),
    # ---- appended after the sections above (positional order never changes) ----
    Field(
        "colorize",
        "reference_scale",
        "Reference streams' resolution",
        "Colorize reference scale",
        "float",
        0.5,
        0.25,
        1.0,
        0.05,
        help="Side of the two reference streams (colour and gray) as a share of the generation size, rounded to "
        "64 px: their keys and values need not have the input's token count. 0.5 costs a quarter of 1 "
        "(the official code's full size).",
    ),
)

SECTION_TITLES: dict[str, str] = {
    "pag": "PAG — Perturbed-Attention Guidance",
    "colorize": "Reference colorization",
    "style": "Style reference (Attention Distillation)",
    "edit_mask": "Automatic edit mask (InstDiffEdit)",
    "yoda": "Masked upscaling (YODA)",
}
SECTION_TABS: dict[str, tuple[str, ...]] = {
    "colorize": ("img2img",),
    "edit_mask": ("img2img",),
}  # sections absent from some tabs

FIELD_BY_KEY: dict[str, Field] = {f.key: f for f in FIELDS}
FIELD_BY_API: dict[str, Field] = {f.api_name: f for f in FIELDS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(f.section for f in FIELDS))


def _for_pass(section: Any, is_hr_pass: bool, name: str) -> Any:
    """A section's settings for one pass: in the hires pass ``hires`` says same, off, or an own ``hires_<name>``."""
    if not is_hr_pass or section.hires == "same":
        return section
    if section.hires == "off":
        return dataclasses.replace(section, enabled=False)
    return dataclasses.replace(section, **{name: getattr(section, f"hires_{name}")})


@dataclass(frozen=True)
class PagSettings:
    enabled: bool = False
    scale: float = 3.0
    adaptive_scale: float = 0.0
    start: float = 0.0
    end: float = 1.0
    layers: str = "middle"
    hires: str = "same"
    hires_scale: float = 3.0

    @property
    def active(self) -> bool:
        return self.enabled and (self.scale > 0 or (self.hires == "own" and self.hires_scale > 0))

    def for_pass(self, is_hr_pass: bool) -> PagSettings:
        """Settings in force for one pass (hires override applied)."""
        return _for_pass(self, is_hr_pass, "scale")


@dataclass(frozen=True)
class ColorizeSettings:
    enabled: bool = False
    reference: tuple = ()  # RGB PIL images
    strength: float = 1.0
    guidance: float = 10.0
    start: float = 0.0
    end: float = 1.0
    layers: str = "auto"
    gamma_fine: float = 0.5
    beta_fine: float = 0.5
    gamma_coarse: float = 1.0
    beta_coarse: float = 0.0
    adain: bool = True
    match_colors: bool = True
    reference_scale: float = 0.5

    @property
    def active(self) -> bool:
        return self.enabled


@dataclass(frozen=True)
class StyleSettings:
    enabled: bool = False
    reference: tuple = ()  # RGB PIL images
    strength: float = 0.2
    iters: int = 1
    start: float = 0.0
    end: float = 1.0
    layers: str = "auto"
    content_weight: float = 0.25
    adain: bool = True
    temperature: float = 1.0
    checkpointing: str = "auto"
    hires: str = "off"
    hires_strength: float = 0.05

    @property
    def active(self) -> bool:
        return self.enabled

    def for_pass(self, is_hr_pass: bool) -> StyleSettings:
        """Settings in force for one pass (hires override applied)."""
        return _for_pass(self, is_hr_pass, "strength")


@dataclass(frozen=True)
class YodaSettings:
    enabled: bool = False
    source: str = "dino-vits8"
    start_coverage: float = 0.25
    growth: float = 1.0
    threshold: float = 1.0
    blur: int = 8
    show: bool = False

    @property
    def active(self) -> bool:
        return self.enabled


@dataclass(frozen=True)
class EditMaskSettings:
    enabled: bool = False
    words: str = ""
    threshold: float = 0.2
    grow: int = 8
    blur: int = 4
    layers: str = "auto"
    object_similarity: float = 0.9
    other_similarity: float = 0.6
    batch_average: bool = False
    show: bool = True
    final: str = "blend"

    @property
    def active(self) -> bool:
        return self.enabled

    @property
    def word_list(self) -> tuple[str, ...]:
        return tuple(w.strip().lower() for w in self.words.replace(";", ",").split(",") if w.strip())


_SECTION_CLASSES = {
    "pag": PagSettings,
    "colorize": ColorizeSettings,
    "style": StyleSettings,
    "edit_mask": EditMaskSettings,
    "yoda": YodaSettings,
}


@dataclass(frozen=True)
class Settings:
    pag: PagSettings = dataclasses.field(default_factory=PagSettings)
    colorize: ColorizeSettings = dataclasses.field(default_factory=ColorizeSettings)
    style: StyleSettings = dataclasses.field(default_factory=StyleSettings)
    edit_mask: EditMaskSettings = dataclasses.field(default_factory=EditMaskSettings)
    yoda: YodaSettings = dataclasses.field(default_factory=YodaSettings)

    @property
    def any_active(self) -> bool:
        return any(getattr(self, s).active for s in SECTIONS)

    # ---- conversions -------------------------------------------------------------------
    def values(self) -> dict[str, Any]:
        """Flat ``{key: value}`` in table order."""
        return {f.key: getattr(getattr(self, f.section), f.name) for f in FIELDS}

    def to_args(self) -> list[Any]:
        """Positional argument list (UI / API order)."""
        return list(self.values().values())

    def to_infotext(self) -> dict[str, str]:
        """Infotext entries for the sections that are switched on."""
        out: dict[str, str] = {}
        for f in FIELDS:
            section = getattr(self, f.section)
            if not section.enabled or f.name == "enabled":
                continue
            value = getattr(section, f.name)
            if f.kind == "str" and value == "":
                continue  # "Key: " with nothing after it trips the WebUI's infotext parser; absent = the default
            out[f.infotext] = f.format(value)
        return out

    def with_values(self, values: Mapping[str, Any]) -> Settings:
        """A copy with some flat keys replaced (values are parsed and checked)."""
        merged = self.values()
        for k, v in values.items():
            f = _lookup(k)
            merged[f.key] = f.parse(v)
        return _build(merged)


def _build(flat: Mapping[str, Any]) -> Settings:
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for f in FIELDS:
        sections[f.section][f.name] = flat[f.key]
    built = {s: _SECTION_CLASSES[s](**kw) for s, kw in sections.items()}
    for s, obj in built.items():
        _check_section(s, obj)
    return Settings(**built)


def _check_section(section: str, obj: Any) -> None:
    if hasattr(obj, "start") and obj.start > obj.end:
        raise FIELD_BY_KEY[f"{section}_end"].error(f"end ({obj.end:g}) must not be below start ({obj.start:g})")
    if section == "colorize" and obj.enabled and not obj.reference:
        raise FIELD_BY_KEY["colorize_reference"].error("reference colorization is on but no colour reference was given")
    if section == "style" and obj.enabled and not obj.reference:
        raise FIELD_BY_KEY["style_reference"].error("style reference is on but no style image was given")
    if section == "edit_mask" and obj.other_similarity > obj.object_similarity:
        raise FIELD_BY_KEY["edit_mask_other_similarity"].error(
            f"{obj.other_similarity:g} must not be above the object word similarity ({obj.object_similarity:g})"
        )


def _lookup(name: str) -> Field:
    f = FIELD_BY_KEY.get(name) or FIELD_BY_API.get(name)
    if f is None:
        known = list(FIELD_BY_KEY) + list(FIELD_BY_API)
        near = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else f"; known names: {', '.join(FIELD_BY_API)}"
        raise SettingsError(str(name), str(name), f"unknown parameter{hint}")
    return f


def defaults() -> Settings:
    return _build({f.key: f.default for f in FIELDS})


def from_named(named: Mapping[str, Any]) -> Settings:
    """Parse the named API form: ``{"pag": {"scale": 3}}`` and/or flat ``{"pag_scale": 3}``."""
    flat: dict[str, Any] = {f.key: f.default for f in FIELDS}
    implied: set[str] = set()
    for k, v in named.items():
        if k in SECTIONS:
            if not isinstance(v, Mapping):
                raise SettingsError(k, k, f"expected an object of {k} parameters, got {type(v).__name__}")
            flat[f"{k}_enabled"] = True
            for name, value in v.items():
                f = _lookup(f"{k}_{name}")
                flat[f.key] = f.parse(value)
        else:
            f = _lookup(k)
            flat[f.key] = f.parse(v)
            if f.name != "enabled":
                implied.add(f.section)
    for section in implied:  # a flat name of a method switches it on unless "enabled" is given
        if not any(_lookup(k).key == f"{section}_enabled" for k in named if k not in SECTIONS):
            flat[f"{section}_enabled"] = True
    return _build(flat)


def from_args(args: Sequence[Any]) -> Settings:
    """Parse the script's positional args, or the named form given as the first (only) arg."""
    args = list(args)
    if args and isinstance(args[0], Mapping):
        return from_named(args[0])
    if len(args) > len(FIELDS):
        extra = args[len(FIELDS) :]
        if any(a is not None for a in extra):
            raise SettingsError("args", "args", f"expected at most {len(FIELDS)} positional values, got {len(args)}")
    flat = {}
    for i, f in enumerate(FIELDS):
        flat[f.key] = f.parse(args[i]) if i < len(args) else f.default
    return _build(flat)


def from_infotext(params: Mapping[str, str]) -> dict[str, Any]:
    """Flat ``{key: value}`` read from pasted infotext; sections present there are switched on."""
    out: dict[str, Any] = {}
    for f in FIELDS:
        if f.infotext in params and f.name != "enabled":
            if f.kind != "image":  # infotext holds only a digest of an image; the control keeps its upload
                out[f.key] = f.parse(params[f.infotext])
            out[f"{f.section}_enabled"] = True
    return out


def infotext_value(field: Field, params: Mapping[str, str]) -> Any:
    """The value a UI control should take when infotext ``params`` is pasted (default when absent)."""
    parsed = from_infotext(params)
    return parsed.get(field.key, field.default)


def fields_of(section: str) -> Iterable[Field]:
    return (f for f in FIELDS if f.section == section)
