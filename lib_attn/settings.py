"""The settings of a generation: every method's fields put together, and how the UI, the API, infotext and
XYZ axes read them.

Each method declares its fields in its own folder; :data:`lib_attn.methods.ORDER` orders them.
``FIELDS`` (in order) is the positional argument list of the script (UI and ``alwayson_scripts[...]["args"]``).
The API also takes a *named* form as its first argument::

    {"alwayson_scripts": {"Attention Toolkit": {"args": [{"pag": {"scale": 3.0, "layers": "middle"}}]}}}

A section named in the named form is switched on unless it says ``"enabled": false``.
Flat names (``{"pag_scale": 3.0}``) are accepted too.  Anything that does not parse raises
:class:`SettingsError`, whose message names the field.

This module is pure Python: no torch, no gradio, no WebUI.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lib_attn.fields import HIRES_MODES, TITLE, Field, SettingsError, image_digest  # noqa: F401  (re-exported)
from lib_attn.methods import BY_NAME, METHODS, positional_fields

XYZ_PREFIX = "[Attention] "
OVERRIDE_ATTR = "attn_toolkit_overrides"  # dict on `p`, filled by XYZ axes and read by the script

FIELDS: tuple[Field, ...] = tuple(positional_fields())
SECTIONS: tuple[str, ...] = tuple(m.name for m in METHODS)
SECTION_TITLES: dict[str, str] = {m.name: m.title for m in METHODS}
SECTION_TABS: dict[str, tuple[str, ...]] = {
    m.name: m.tabs for m in METHODS if m.tabs != ("txt2img", "img2img")
}  # sections absent from some tabs
FIELD_BY_KEY: dict[str, Field] = {f.key: f for f in FIELDS}
FIELD_BY_API: dict[str, Field] = {f.api_name: f for f in FIELDS}


class Settings:
    """Every method's settings section, by method name (``settings.pag.scale``); frozen."""

    __slots__ = ("_sections",)

    def __init__(self, sections: Mapping[str, Any] | None = None):
        if sections is None:
            sections = {m.name: m.settings_class() for m in METHODS}
        object.__setattr__(self, "_sections", dict(sections))

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "_sections")[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Settings are frozen")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and self._sections == other._sections

    def __hash__(self) -> int:
        return hash(tuple(self._sections.items()))

    def __repr__(self) -> str:
        return f"Settings({self._sections!r})"

    def section(self, name: str) -> Any:
        return self._sections[name]

    @property
    def any_active(self) -> bool:
        return any(s.active for s in self._sections.values())

    # ---- conversions -------------------------------------------------------------------
    def values(self) -> dict[str, Any]:
        """Flat ``{key: value}`` in table order."""
        return {f.key: getattr(self._sections[f.section], f.name) for f in FIELDS}

    def to_args(self) -> list[Any]:
        """Positional argument list (UI / API order)."""
        return list(self.values().values())

    def to_infotext(self) -> dict[str, str]:
        """Infotext entries for the sections that are switched on."""
        out: dict[str, str] = {}
        for f in FIELDS:
            section = self._sections[f.section]
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
    built = {}
    for m in METHODS:
        section = m.settings_class(**{f.name: flat[f.key] for f in m.fields})
        section.check()
        built[m.name] = section
    return Settings(built)


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


def pastable(field: Field) -> bool:
    """Whether pasting infotext sets this field's control (an image control keeps its upload)."""
    return bool(field.infotext) and field.kind != "image"


def pasted_value(field: Field, params: Mapping[str, str]) -> Any:
    """The value a pastable field's control takes when infotext ``params`` is pasted, judged on this field alone.

    A section's ``enabled`` (never written: a section present is on) is whether any other entry of the section is
    there; any other field takes its entry, or its default where the entry is absent or malformed, so that a
    control missing from the infotext goes back to its default and one bad entry does not stop the rest from
    pasting."""
    if field.name == "enabled":
        return any(g.infotext in params for g in fields_of(field.section) if g.name != "enabled")
    if field.infotext in params:
        try:
            return field.parse(params[field.infotext])
        except SettingsError:
            pass
    return field.default


def fields_of(section: str) -> Iterable[Field]:
    """A section's fields in UI order."""
    return iter(BY_NAME[section].fields)
