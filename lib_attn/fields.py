"""A parameter of a method (:class:`Field`), how raw values parse, and the base of a method's settings section.

Pure Python: no torch, no gradio, no WebUI.  Each method declares its fields in its own folder
(``lib_attn/methods/<name>/__init__.py``); :mod:`lib_attn.settings` puts them together.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

TITLE = "Attention Toolkit"
HIRES_MODES = ("same", "own", "off")


class SettingsError(ValueError):
    """A parameter did not parse.  ``field`` is the API name (``pag.scale``), ``label`` the UI label."""

    def __init__(self, field: str, label: str, message: str):
        self.field = field
        self.label = label
        super().__init__(f"{TITLE}: {label} ({field}): {message}")


@dataclass(frozen=True)
class Field:
    """One parameter.  Declared with keywords after the section and name, e.g.
    ``Field("pag", "scale", label="PAG scale", infotext="PAG scale", kind="float", default=3.0, ...)``."""

    section: str  # method section, e.g. "pag"
    name: str  # name inside the section, e.g. "scale"
    _: dataclasses.KW_ONLY
    label: str  # UI label
    infotext: str  # infotext key
    kind: str  # "bool" | "float" | "int" | "str" | "choice" | "image"
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""
    options: str | None = None  # kind "str": a list of the WebUI's the UI offers ("checkpoints"); any text is kept

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
        low = "-inf" if f.minimum is None else f"{f.minimum:g}"
        high = "inf" if f.maximum is None else f"{f.maximum:g}"
        raise f.error(f"{x:g} is out of range [{low}, {high}]")
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


def interval(section: str, prefix: str, who: str) -> tuple[Field, Field]:
    """The start/end pair every method has: its active interval as a fraction of the pass's steps."""
    return (
        Field(
            section,
            "start",
            label="Start (fraction of steps)",
            infotext=f"{prefix} start",
            kind="float",
            default=0.0,
            minimum=0.0,
            maximum=1.0,
            step=0.01,
            help=f"{who} from this fraction of the sampling steps...",
        ),
        Field(
            section,
            "end",
            label="End (fraction of steps)",
            infotext=f"{prefix} end",
            kind="float",
            default=1.0,
            minimum=0.0,
            maximum=1.0,
            step=0.01,
            help="...up to this fraction of the sampling steps (inclusive).",
        ),
    )


def hires_fields(
    section: str, prefix: str, value: str, label: str, default: float, maximum: float, minimum: float = 0.0
) -> tuple:
    """The hires-fix override pair: ``hires`` (same / own / off) and ``hires_<value>``, the own value (``label`` names
    it in the UI, e.g. "SEG scale")."""
    return (
        Field(
            section,
            "hires",
            label="Hires pass",
            infotext=f"{prefix} hires",
            kind="choice",
            default="same",
            choices=HIRES_MODES,
            help=f"In the hires-fix pass: same settings as the first pass, an own {value}, or off.",
        ),
        Field(
            section,
            f"hires_{value}",
            label=f"Hires {label}",
            infotext=f"{prefix} hires {value}",
            kind="float",
            default=default,
            minimum=minimum,
            maximum=maximum,
            step=0.01 if maximum <= 5 else 0.1,
            help=f"{label} used in the hires-fix pass when 'Hires pass' is 'own'.",
        ),
    )


class Section:
    """Base of a method's settings section.  :func:`section_class` makes the frozen dataclass of a method's fields
    on top of it (or of a subclass the method gives, for its own properties and checks)."""

    FIELDS: ClassVar[dict[str, Field]] = {}
    HIRES_VALUE: ClassVar[str | None] = None  # the value a hires ``own`` override replaces (``hires_<value>``)

    enabled: bool

    @property
    def active(self) -> bool:
        """Whether the method does anything in this generation (off: nothing is installed)."""
        return self.enabled

    def for_pass(self, is_hr_pass: bool) -> Any:
        """The settings in force for one pass: in the hires pass ``hires`` says same, off, or an own value."""
        name = self.HIRES_VALUE
        if name is None or not is_hr_pass or self.hires == "same":
            return self
        if self.hires == "off":
            return dataclasses.replace(self, enabled=False)
        return dataclasses.replace(self, **{name: getattr(self, f"hires_{name}")})

    def check(self) -> None:
        """Cross-field checks; raise the offending field's error."""
        start, end = getattr(self, "start", None), getattr(self, "end", None)
        if start is not None and end is not None and start > end:
            raise self.FIELDS["end"].error(f"end ({end:g}) must not be below start ({start:g})")


class ScaledSection(Section):
    """A guidance method whose ``scale`` of 0 switches it off, with a hires ``own`` scale."""

    HIRES_VALUE = "scale"

    @property
    def active(self) -> bool:
        return self.enabled and (self.scale > 0 or (self.hires == "own" and self.hires_scale > 0))


def section_class(name: str, fields: tuple[Field, ...], base: type = Section) -> type:
    """The frozen settings dataclass of a section: one attribute per field, its default the field's."""
    cls = dataclasses.make_dataclass(
        "".join(part.title() for part in name.split("_")) + "Settings",
        [(f.name, Any, dataclasses.field(default=f.default)) for f in fields],
        bases=(base,),
        frozen=True,
    )
    cls.FIELDS = {f.name: f for f in fields}
    return cls
