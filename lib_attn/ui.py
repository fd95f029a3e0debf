"""The gradio UI, built from :data:`lib_attn.settings.FIELDS` (the only module of lib_attn that imports gradio).

One accordion, one sub-section per method section.  A section's ``enabled`` checkbox sits on top; the section's
other controls live in a body column that a gradio ``.change`` event shows only while the checkbox is on.
Works on gradio 3.41 (A1111, Forge-old, reForge) and gradio 4.x (Forge).

Hover help: every control also gets its ``help`` text as gradio's ``info=`` line where the component supports it,
and a hidden HTML block per tab carries :func:`page_data` (``{"help": {elem_id: help}, "sections": [...],
"sync": elem_id}``) as JSON for ``javascript/attention_toolkit.js``, which sets the ``title`` of each control and,
on page load, clicks the hidden sync button when a body's visibility disagrees with its checkbox.  The help texts
live only in ``settings.py``.
"""

from __future__ import annotations

import html
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from lib_attn import settings as S

GRADIO_MAJOR: int = int(str(getattr(gr, "__version__", "3")).split(".")[0] or 3)

# Section headings; settings.py may provide its own ``SECTION_TITLES`` (it wins), unknown sections fall back to
# their name.
SECTION_TITLES: dict[str, str] = {
    "pag": "PAG — Perturbed-Attention Guidance",
}

CSS_ROOT = "attn-toolkit"  # class of the outer accordion; style.css scopes everything under it
DATA_ATTR = "data-attn-toolkit"  # attribute holding the JSON read by javascript/attention_toolkit.js
RADIO_MAX_CHOICES = 4  # choice fields with more options become a dropdown


@dataclass
class UiParts:
    components: list[Any]  # one per Field, in FIELDS order: the script's positional args
    infotext_fields: list[tuple[Any, Callable[[Mapping[str, str]], Any]]]  # (control, its value from pasted params)
    paste_field_names: list[str]
    sections: dict[str, SectionParts] = field(default_factory=dict)
    help: dict[str, str] = field(default_factory=dict)  # elem_id -> help text, as given to the JS


@dataclass
class SectionParts:
    name: str
    title: str
    enabled: Any | None  # the section's enable checkbox (None when the section has no "enabled" field)
    body: Any  # the column shown only while ``enabled`` is on


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def section_title(section: str) -> str:
    titles = getattr(S, "SECTION_TITLES", None) or {}
    return titles.get(section) or SECTION_TITLES.get(section) or section.replace("_", " ").title()


def _accepts(cls: type, name: str) -> bool:
    """Whether ``cls.__init__`` names parameter ``name`` (``**kwargs`` does not count)."""
    try:
        return name in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def _with_info(cls: type, kwargs: dict[str, Any], help_text: str) -> dict[str, Any]:
    if help_text and _accepts(cls, "info"):
        kwargs["info"] = help_text
    return kwargs


def image_kwargs() -> dict[str, Any]:
    """Upload-only image input, spelled for the running gradio major version."""
    if GRADIO_MAJOR >= 4:
        return {"sources": ["upload"], "type": "pil"}
    return {"source": "upload", "type": "pil"}


def _same_row(a: S.Field, b: S.Field) -> bool:
    """Fields drawn side by side: ``start``/``end`` pairs and ``x``/``x_<something>`` (e.g. hires, hires_scale)."""
    if a.section != b.section or a.kind == "image" or b.kind == "image":
        return False
    if a.name.endswith("start") and b.name == a.name[: -len("start")] + "end":
        return True
    return b.name.startswith(a.name + "_")


def _rows(fields: Sequence[S.Field]) -> list[list[S.Field]]:
    rows: list[list[S.Field]] = []
    for f in fields:
        if rows and len(rows[-1]) == 1 and _same_row(rows[-1][0], f):
            rows[-1].append(f)
        else:
            rows.append([f])
    return rows


def info_under_title(title: str, help_text: str) -> str:
    """The info line of a section's switch, drawn right under the section's title: the help text without a leading
    "<method name>: " that the title already shows (the hover help keeps it)."""
    head, sep, rest = help_text.partition(": ")
    if sep and rest and head.lower() in title.lower():
        return rest[:1].upper() + rest[1:]
    return help_text


def make_component(f: S.Field, elem_id: str, info: str | None = None) -> Any:
    """One gradio input for one Field (must be called inside a gradio Blocks context); ``info`` replaces the help
    text as the line under the label."""
    common: dict[str, Any] = {"label": f.label, "elem_id": elem_id}
    if f.kind == "bool":
        return gr.Checkbox(value=bool(f.default), **_with_info(gr.Checkbox, common, info or f.help))
    if f.kind in ("float", "int"):
        is_int = f.kind == "int"
        if f.minimum is not None and f.maximum is not None:
            step = f.step if f.step is not None else (1 if is_int else (f.maximum - f.minimum) / 100)
            return gr.Slider(
                minimum=f.minimum,
                maximum=f.maximum,
                step=step,
                value=f.default,
                **_with_info(gr.Slider, common, f.help),
            )
        return gr.Number(value=f.default, precision=0 if is_int else None, **_with_info(gr.Number, common, f.help))
    if f.kind == "choice":
        choices = list(f.choices or ())
        cls = gr.Radio if len(choices) <= RADIO_MAX_CHOICES else gr.Dropdown
        return cls(choices=choices, value=f.default, **_with_info(cls, common, f.help))
    if f.kind == "str" and f.options == "checkpoints":
        from lib_attn import host

        kwargs = {"allow_custom_value": True} if _accepts(gr.Dropdown, "allow_custom_value") else {}
        choices = ["", *host.checkpoint_titles()]
        return gr.Dropdown(choices=choices, value=f.default or "", **kwargs, **_with_info(gr.Dropdown, common, f.help))
    if f.kind == "str":
        return gr.Textbox(value=f.default or "", lines=1, max_lines=1, **_with_info(gr.Textbox, common, f.help))
    if f.kind == "image":
        return gr.Image(value=None, **image_kwargs(), **common)
    raise ValueError(f"{S.TITLE}: no UI for field {f.api_name} of kind {f.kind!r}")


def _restorer(f: S.Field) -> Callable[[Mapping[str, str]], Any]:
    """The value this field's control takes when an infotext is pasted (its default when the entry is absent or
    malformed; see ``settings.pasted_value``)."""

    def restore(params: Mapping[str, str]) -> Any:
        return S.pasted_value(f, params)

    restore.__name__ = f"restore_{f.key}"
    return restore


SEND_TO_IMG2IMG = "txt2img_send_to_img2img"  # elem_id of the WebUI's "send to img2img" button (A1111, Forge)


class SendToImg2img:
    """Wires the WebUI's "send to img2img" button to copy every toolkit control from txt2img to img2img.

    The WebUI's own copy (``infotext_utils.connect_paste_params_buttons``) takes only paste fields keyed by a name
    listed in ``paste_field_names``; the toolkit's paste fields are keyed by functions (so that pasting an infotext
    without a control's entry resets it to its default), which that copy skips.  The page is built in this order:
    txt2img's controls, txt2img's output panel with the button, img2img's controls; ``tab_built`` and
    ``component`` (the ``after_component`` callback) record each, and the click is added once all three exist.
    A rebuilt UI (Reload UI) starts over at txt2img."""

    def __init__(self) -> None:
        self.parts: dict[str, UiParts] = {}
        self.button: Any = None

    def tab_built(self, tab: str, parts: UiParts) -> None:
        if tab == "txt2img":
            self.parts, self.button = {}, None
        self.parts[tab] = parts
        self._wire()

    def component(self, component: Any, elem_id: str | None) -> None:
        if elem_id == SEND_TO_IMG2IMG:
            self.button = component
            self._wire()

    def _wire(self) -> None:
        src, dst, button = self.parts.get("txt2img"), self.parts.get("img2img"), self.button
        if src is None or dst is None or button is None:
            return
        keys = [i for i, f in enumerate(S.FIELDS) if S.pastable(f)]
        button.click(
            fn=_same,
            inputs=[src.components[i] for i in keys],
            outputs=[dst.components[i] for i in keys],
            show_progress="hidden",
            queue=False,
        )
        self.button = None  # wired once per built page


def _same(*values: Any) -> Any:
    return values[0] if len(values) == 1 else list(values)


SEND_TO = SendToImg2img()


def page_data(help_by_id: Mapping[str, str], sections: Mapping[str, SectionParts], sync_id: str | None) -> dict:
    """What the JS needs: hover help per elem_id, each section's checkbox/body ids, the sync button's id."""
    return {
        "help": dict(help_by_id),
        "sections": [
            {"name": s.name, "enabled": s.enabled.elem_id, "body": s.body.elem_id}
            for s in sections.values()
            if s.enabled is not None
        ],
        "sync": sync_id,
    }


def data_html(data: Mapping[str, Any]) -> str:
    """Hidden element carrying :func:`page_data` as JSON in an attribute (an attribute survives HTML sanitizers)."""
    payload = json.dumps(dict(data), ensure_ascii=True)
    return f'<div hidden class="{CSS_ROOT}-data" {DATA_ATTR}="{html.escape(payload, quote=True)}"></div>'


def _visibility(on: Any) -> Any:
    return gr.update(visible=bool(on))


def _visibilities(*values: Any) -> Any:
    updates = [_visibility(v) for v in values]
    return updates[0] if len(updates) == 1 else updates


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------
def _build_section(
    section: str, elem_id: Callable[[str], str], by_key: dict[str, Any], visible: bool = True
) -> SectionParts:
    fields = list(S.fields_of(section))
    enabled_field = next((f for f in fields if f.name == "enabled" and f.kind == "bool"), None)
    rest = [f for f in fields if f is not enabled_field]
    title = section_title(section)
    enabled = None
    with gr.Group(elem_id=elem_id(f"{section}_section"), elem_classes=[f"{CSS_ROOT}-section"], visible=visible):
        gr.HTML(
            f'<div class="{CSS_ROOT}-section-title">{html.escape(title)}</div>',
            elem_classes=[f"{CSS_ROOT}-section-head"],
        )
        if enabled_field is not None:
            info = info_under_title(title, enabled_field.help)
            enabled = by_key[enabled_field.key] = make_component(enabled_field, elem_id(enabled_field.key), info)
        body_visible = enabled_field is None or bool(enabled_field.default)
        with gr.Column(
            visible=body_visible, elem_id=elem_id(f"{section}_body"), elem_classes=[f"{CSS_ROOT}-body"]
        ) as body:
            for row in _rows(rest):
                if len(row) == 1:
                    by_key[row[0].key] = make_component(row[0], elem_id(row[0].key))
                    continue
                with gr.Row(elem_classes=[f"{CSS_ROOT}-row"]):
                    for f in row:
                        by_key[f.key] = make_component(f, elem_id(f.key))
    if enabled is not None:
        # .change fires on clicks and on programmatic updates (pasted infotext), on gradio 3.41 and 4.x alike.
        enabled.change(fn=_visibility, inputs=[enabled], outputs=[body], show_progress="hidden", queue=False)
    return SectionParts(section, title, enabled, body)


def build(is_img2img: bool, elem_id: Callable[[str], str]) -> UiParts:
    """Create the controls inside the current gradio context.

    ``elem_id`` is the script's ``Script.elem_id`` (it makes the ids unique per tab).  Sections that
    ``settings.SECTION_TABS`` limits to other tabs are built hidden (their controls are still positional args).
    """
    by_key: dict[str, Any] = {}
    sections: dict[str, SectionParts] = {}
    help_by_id: dict[str, str] = {elem_id(f.key): f.help for f in S.FIELDS}

    with gr.Accordion(S.TITLE, open=False, elem_id=elem_id("accordion"), elem_classes=[CSS_ROOT]):
        tab = "img2img" if is_img2img else "txt2img"
        for section in S.SECTIONS:
            # a section absent from this tab still makes its controls (they are positional args), hidden
            shown = tab in getattr(S, "SECTION_TABS", {}).get(section, (tab,))
            sections[section] = _build_section(section, elem_id, by_key, visible=shown)

        # Clicked by the JS once the page has loaded: re-derives every body's visibility from its checkbox
        # (a checkbox default changed in ui-config.json would otherwise start with its body hidden).
        toggles = [s for s in sections.values() if s.enabled is not None]
        sync_id = None
        if toggles:
            sync_id = elem_id("sync")
            sync = gr.Button(f"{S.TITLE}: sync", elem_id=sync_id, elem_classes=[f"{CSS_ROOT}-hidden"])
            sync.click(
                fn=_visibilities,
                inputs=[s.enabled for s in toggles],
                outputs=[s.body for s in toggles],
                show_progress="hidden",
                queue=False,
            )
        # Kept visible for gradio (so it is in the DOM on every version) and hidden by style.css.
        gr.HTML(
            data_html(page_data(help_by_id, sections, sync_id)),
            elem_id=elem_id("data"),
            elem_classes=[f"{CSS_ROOT}-hidden"],
        )

    components = [by_key[f.key] for f in S.FIELDS]
    pastable = [f for f in S.FIELDS if S.pastable(f)]
    infotext_fields = [(by_key[f.key], _restorer(f)) for f in pastable]
    paste_field_names = [f.infotext for f in pastable]
    return UiParts(components, infotext_fields, paste_field_names, sections, help_by_id)
