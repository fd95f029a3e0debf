"""lib_attn/ui.py against the real gradio (4.40, as Forge ships), plus checks of javascript/ and style.css.

gradio is a test requirement: if it cannot be imported these tests fail, unless ATTN_TOOLKIT_NO_GRADIO=1 is set.
"""

from __future__ import annotations

import html
import json
import os
import pathlib
import re
import shutil
import subprocess

import pytest

from lib_attn import settings as S
from tests.support.helpers import non_default_settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
JS = ROOT / "javascript" / "attention_toolkit.js"
CSS = ROOT / "style.css"
TABS = ("txt2img", "img2img")


def _elem_id_for(tab: str):
    # the shape of Script.elem_id for an AlwaysVisible script titled "Attention Toolkit"
    return lambda item: f"script_{tab}_attention_toolkit_{item}"


@pytest.fixture(scope="module")
def gr():
    try:
        import gradio
    except ImportError as e:
        if os.environ.get("ATTN_TOOLKIT_NO_GRADIO") == "1":
            pytest.skip(f"ATTN_TOOLKIT_NO_GRADIO=1 and gradio is missing ({e})")
        pytest.fail(f"gradio is a test requirement and does not import ({e}); set ATTN_TOOLKIT_NO_GRADIO=1 to skip")
    return gradio


@pytest.fixture(scope="module")
def ui(gr):
    from lib_attn import ui

    return ui


@pytest.fixture(scope="module")
def built(gr, ui):
    parts = {}
    with gr.Blocks() as demo:
        for tab in TABS:
            parts[tab] = ui.build(tab == "img2img", _elem_id_for(tab))
    return demo, parts


def _choices(component) -> list:
    return [c[1] if isinstance(c, (tuple, list)) else c for c in component.choices]


def _ancestors(block):
    out = []
    block = getattr(block, "parent", None)
    while block is not None:
        out.append(block)
        block = getattr(block, "parent", None)
    return out


def _fns(demo):
    return list(demo.fns.values()) if isinstance(demo.fns, dict) else list(demo.fns)


def _page_data(gr, demo, tab: str) -> dict:
    for block in demo.blocks.values():
        if isinstance(block, gr.HTML) and block.elem_id == _elem_id_for(tab)("data"):
            m = re.search(r'data-attn-toolkit="([^"]*)"', block.value)
            assert m, block.value
            return json.loads(html.unescape(m.group(1)))
    raise AssertionError(f"no data block in {tab}")


# --------------------------------------------------------------------------------------------
# components
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tab", TABS)
def test_one_component_per_field_in_order(gr, built, tab):
    _, parts = built
    comps = parts[tab].components
    assert len(comps) == len(S.FIELDS)
    for f, c in zip(S.FIELDS, comps, strict=True):
        assert c.elem_id == _elem_id_for(tab)(f.key), f.key
        assert c.label == f.label
        if f.kind == "bool":
            assert isinstance(c, gr.Checkbox)
            assert c.value is f.default
        elif f.kind in ("float", "int") and f.maximum is None:  # an open range: a number box
            assert isinstance(c, gr.Number), f.key
            assert c.value == f.default
        elif f.kind in ("float", "int"):
            assert isinstance(c, gr.Slider), f.key
            assert (c.minimum, c.maximum, c.step) == (f.minimum, f.maximum, f.step), f.key
            assert c.value == f.default
        elif f.kind == "choice":
            assert isinstance(c, (gr.Radio, gr.Dropdown))
            assert _choices(c) == list(f.choices)
            assert c.value == f.default
        elif f.kind == "str" and f.options == "checkpoints":  # the WebUI's checkpoint list, any name typed too
            assert isinstance(c, gr.Dropdown), f.key
            assert c.value == f.default and "" in _choices(c)
            assert getattr(c, "allow_custom_value", True)
        elif f.kind == "str":
            assert isinstance(c, gr.Textbox)
            assert c.value == f.default
            assert c.max_lines == 1
        elif f.kind == "image":
            assert isinstance(c, gr.Image)
        else:
            raise AssertionError(f"unexpected kind {f.kind}")
        if f.help and f.kind != "image" and f.name != "enabled":  # gr.Image takes no info line; the JS gives it hover
            assert c.info == f.help  # help (a section's switch: test_section_switch_info_does_not_repeat_the_title)


def test_ids_are_unique_and_differ_per_tab(built):
    _, parts = built
    ids = [c.elem_id for tab in TABS for c in parts[tab].components]
    assert len(ids) == len(set(ids))


def test_layout(gr, built):
    _, parts = built
    p = parts["txt2img"]
    by_key = dict(zip((f.key for f in S.FIELDS), p.components, strict=True))
    accordions = [a for a in _ancestors(p.components[0]) if isinstance(a, gr.Accordion)]
    assert [a.label for a in accordions] == [S.TITLE]
    assert accordions[0].open is False
    for section in S.SECTIONS:
        sp = p.sections[section]
        assert sp.title
        enabled = by_key.get(f"{section}_enabled")
        assert sp.enabled is enabled
        assert sp.body.visible is (enabled is None or bool(enabled.value))
        for f in S.fields_of(section):
            inside = sp.body in _ancestors(by_key[f.key])
            assert inside is (f.name != "enabled"), f.key
    # start/end share one row
    start, end = (
        next(a for a in _ancestors(by_key[k]) if isinstance(a, (gr.Row, gr.Column))) for k in ("pag_start", "pag_end")
    )
    assert isinstance(start, gr.Row)
    assert start is end


def test_enable_checkbox_drives_body_visibility(built):
    demo, parts = built
    fns = _fns(demo)
    for tab in TABS:
        for sp in parts[tab].sections.values():
            if sp.enabled is None:
                continue
            fn = next(f for f in fns if list(f.inputs) == [sp.enabled] and list(f.outputs) == [sp.body])
            assert fn.fn(True)["visible"] is True
            assert fn.fn(False)["visible"] is False
        # the sync button (clicked by the JS on page load) re-derives every body from its checkbox
        toggles = [sp for sp in parts[tab].sections.values() if sp.enabled is not None]
        sync = next(f for f in fns if list(f.outputs) == [sp.body for sp in toggles] and len(f.inputs) == len(toggles))
        out = sync.fn(*[True] * len(toggles))
        outs = [out] if len(toggles) == 1 else list(out)
        assert all(u["visible"] is True for u in outs)


# --------------------------------------------------------------------------------------------
# infotext
# --------------------------------------------------------------------------------------------
def _pasted(parts, params: dict) -> dict:
    """What the WebUI's paste gives each control (tests/fakes/common/paste.py), after the script's callback."""
    from tests.fakes.common.paste import paste_values

    values = paste_values(parts.infotext_fields, dict(params))
    return {c.elem_id: v for (c, _), v in zip(parts.infotext_fields, values, strict=True)}


def test_infotext_restores_every_control(built):
    from tests.fakes.common.paste import UNCHANGED

    _, parts = built
    chosen = non_default_settings()
    params = chosen.to_infotext()
    want = chosen.values()
    for tab in TABS:
        p = parts[tab]
        assert p.paste_field_names == [f.infotext for f in S.FIELDS if f.kind != "image"]
        assert all(callable(key) for _, key in p.infotext_fields)  # absent entries reset to defaults
        got = _pasted(p, params)
        for f, c in zip(S.FIELDS, p.components, strict=True):
            if f.kind != "image":  # an image control keeps its upload; infotext only records a digest
                assert got[c.elem_id] is not UNCHANGED, f.key
                assert got[c.elem_id] == want[f.key], f.key
                assert type(got[c.elem_id]) is type(c.value) or f.kind in ("int", "float"), f.key


def test_infotext_without_keys_resets_to_defaults(built):
    _, parts = built
    other = {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7"}
    for tab in TABS:
        p = parts[tab]
        got = _pasted(p, other)
        for f, c in zip(S.FIELDS, p.components, strict=True):
            if f.kind != "image":
                assert got[c.elem_id] == f.default, f.key


def test_infotext_with_one_section_resets_the_others(built):
    _, parts = built
    chosen = non_default_settings()
    pag_only = {k: v for k, v in chosen.to_infotext().items() if k.startswith("PAG ")}
    want = chosen.values()
    got = _pasted(parts["txt2img"], pag_only)
    for f, c in zip(S.FIELDS, parts["txt2img"].components, strict=True):
        if f.kind != "image":
            assert got[c.elem_id] == (want[f.key] if f.section == "pag" else f.default), f.key


def test_malformed_infotext_entry_does_not_break_paste(built):
    _, parts = built
    p = parts["txt2img"]
    got = _pasted(p, {"PAG scale": "lots", "PAG layers": "all"})
    got = {f.key: got[c.elem_id] for f, c in zip(S.FIELDS, p.components, strict=True) if f.kind != "image"}
    assert got["pag_enabled"] is True
    assert got["pag_scale"] == S.FIELD_BY_KEY["pag_scale"].default
    assert got["pag_layers"] == "all"


def test_send_to_img2img_copies_every_toolkit_control(gr, ui):
    """The WebUI's own "send to img2img" copies only name-keyed paste fields (none of ours); SendToImg2img adds a
    click that copies every pastable control, in the order the page is built (txt2img, its button, img2img)."""
    from tests.fakes.common.paste import send_to_pairs

    wiring = ui.SendToImg2img()
    with gr.Blocks() as demo:
        src = ui.build(False, _elem_id_for("txt2img"))
        wiring.tab_built("txt2img", src)
        button = gr.Button("send", elem_id=ui.SEND_TO_IMG2IMG)
        wiring.component(button, ui.SEND_TO_IMG2IMG)
        before = len(_fns(demo))
        dst = ui.build(True, _elem_id_for("img2img"))
        wiring.tab_built("img2img", dst)
    assert send_to_pairs(src.infotext_fields, dst.infotext_fields, src.paste_field_names) == ([], [])
    added = [fn for fn in _fns(demo)[before:] if fn.fn is ui._same]
    assert len(added) == 1
    want = [f.key for f in S.FIELDS if f.kind != "image"]
    assert [b.elem_id for b in added[0].inputs] == [_elem_id_for("txt2img")(k) for k in want]
    assert [b.elem_id for b in added[0].outputs] == [_elem_id_for("img2img")(k) for k in want]
    assert ui._same(1) == 1 and ui._same(1, 2) == [1, 2]


# --------------------------------------------------------------------------------------------
# help table for the JS
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tab", TABS)
def test_page_data_holds_every_help_text(gr, built, tab):
    demo, parts = built
    data = _page_data(gr, demo, tab)
    assert data["help"] == {_elem_id_for(tab)(f.key): f.help for f in S.FIELDS}
    assert parts[tab].help == data["help"]
    assert all(data["help"].values())
    sections = {s["name"]: s for s in data["sections"]}
    for name, sp in parts[tab].sections.items():
        if sp.enabled is not None:
            assert sections[name] == {"name": name, "enabled": sp.enabled.elem_id, "body": sp.body.elem_id}
    assert data["sync"] == _elem_id_for(tab)("sync")
    assert any(b.elem_id == data["sync"] for b in demo.blocks.values() if isinstance(b, gr.Button))


# --------------------------------------------------------------------------------------------
# generic pieces (future fields)
# --------------------------------------------------------------------------------------------
def test_image_field_uses_the_running_gradio_kwargs(gr, ui):
    field = S.Field("demo", "image", label="Reference image", infotext="", kind="image", default=None, help="an image")
    with gr.Blocks():
        c = ui.make_component(field, "demo_image")
    assert isinstance(c, gr.Image)
    assert c.type == "pil"
    if int(gr.__version__.split(".")[0]) >= 4:
        assert list(c.sources) == ["upload"]
    else:
        assert c.source == "upload"


def test_other_kinds(gr, ui):
    with gr.Blocks():
        n = ui.make_component(S.Field("demo", "n", label="N", infotext="N", kind="int", default=2, minimum=1, maximum=8, step=1), "demo_n")
        free = ui.make_component(S.Field("demo", "x", label="X", infotext="X", kind="float", default=0.5), "demo_x")
        many = ui.make_component(S.Field("demo", "m", label="M", infotext="M", kind="choice", default="a", choices=tuple("abcdef")), "demo_m")
        with pytest.raises(ValueError, match="no UI"):
            ui.make_component(S.Field("demo", "z", label="Z", infotext="Z", kind="tensor", default=None), "demo_z")
    assert isinstance(n, gr.Slider) and n.step == 1
    assert isinstance(free, gr.Number)
    assert isinstance(many, gr.Dropdown)


def test_no_gradio_3_only_or_4_only_calls():
    src = (ROOT / "lib_attn" / "ui.py").read_text(encoding="utf-8")
    for bad in (".style(", "gr.Box", "tool=", "_js=", "js="):
        assert bad not in src, bad


# --------------------------------------------------------------------------------------------
# javascript / css
# --------------------------------------------------------------------------------------------
def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: cannot check javascript/attention_toolkit.js")
    return node


def test_js_parses():
    subprocess.run([_node(), "--check", str(JS)], check=True)


# A fake page: one data block per tab, checkbox wrappers holding an <input>, bodies, sync buttons.
_JS_HARNESS = r"""
const fs = require("fs"), vm = require("vm");
const data = JSON.parse(process.argv[1]);     // [page data per tab]
const state = JSON.parse(process.argv[2]);    // {checkbox id: checked, body id: hidden}
const els = {}, clicks = [];
function el(id) {
  if (!(id in els)) {
    els[id] = {
      id, title: "", tagName: "DIV",
      classList: {contains: (c) => c === "hide" && state.hidden[id] === true},
      querySelector: (sel) => sel.startsWith("input") && id in state.checked ? {checked: state.checked[id]}
                              : sel === "button" ? {click: () => clicks.push(id)} : null,
      click: () => clicks.push(id),
    };
  }
  return els[id];
}
const present = new Set();
data.forEach((d) => { Object.keys(d.help).forEach((k) => present.add(k));
                      d.sections.forEach((s) => { present.add(s.enabled); present.add(s.body); });
                      present.add(d.sync); });
const blocks = data.map((d) => ({getAttribute: () => JSON.stringify(d)}));
const document = {
  querySelectorAll: (sel) => (sel === "[data-attn-toolkit]" ? blocks : []),
  querySelector: (sel) => { const m = /^\[id="(.*)"\]$/.exec(sel); return m && present.has(m[1]) ? el(m[1]) : null; },
};
let loaded = null, updated = null;
const ctx = {document, console, JSON, Object, String,
             getComputedStyle: () => ({display: "flex"}),
             onUiLoaded: (f) => { loaded = f; }, onAfterUiUpdate: (f) => { updated = f; }};
ctx.window = ctx;
vm.createContext(ctx);
const before = new Set(Object.keys(ctx));
vm.runInContext(fs.readFileSync(process.argv[3], "utf8"), ctx);
const added = Object.keys(ctx).filter((k) => !before.has(k));
loaded();
updated();
const titles = {};
Object.keys(els).forEach((k) => { if (els[k].title) titles[k] = els[k].title; });
console.log(JSON.stringify({added, titles, clicks, loaded: !!loaded, updated: !!updated}));
"""


def _run_js(data: list, checked: dict, hidden: dict) -> dict:
    out = subprocess.run(
        [_node(), "-e", _JS_HARNESS, json.dumps(data), json.dumps({"checked": checked, "hidden": hidden}), str(JS)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_js_sets_titles_and_syncs_only_mismatched_tabs(gr, built):
    demo, parts = built
    data = [_page_data(gr, demo, tab) for tab in TABS]
    t2i, i2i = (parts[tab].sections["pag"] for tab in TABS)
    # txt2img: off and hidden (in step); img2img: on (e.g. ui-config default) but hidden -> needs a sync
    checked = {t2i.enabled.elem_id: False, i2i.enabled.elem_id: True}
    hidden = {t2i.body.elem_id: True, i2i.body.elem_id: True}
    res = _run_js(data, checked, hidden)
    assert res["added"] == ["attentionToolkit"]
    assert res["loaded"] and res["updated"]
    want = {k: v for d in data for k, v in d["help"].items()}
    assert res["titles"] == want
    assert res["clicks"] == [_elem_id_for("img2img")("sync")]


def test_js_tolerates_an_empty_page():
    script = (
        "const fs=require('fs'),vm=require('vm');"
        "const ctx={console,JSON,Object,String,document:{querySelectorAll:()=>[],querySelector:()=>null},"
        "onUiLoaded:(f)=>f()};ctx.window=ctx;vm.createContext(ctx);"
        "vm.runInContext(fs.readFileSync(process.argv[1],'utf8'),ctx);"
        "const a=ctx.window.attentionToolkit;"
        "console.log(JSON.stringify([a.applyHelp(),a.syncSections(),a.readData()]));"
    )
    out = subprocess.run([_node(), "-e", script, str(JS)], check=True, capture_output=True, text=True)
    assert json.loads(out.stdout) == [0, [], []]
    assert out.stderr == ""


def test_css_is_scoped():
    css = re.sub(r"/\*.*?\*/", "", CSS.read_text(encoding="utf-8"), flags=re.S)
    selectors = [s.strip() for block in re.findall(r"([^{}]+)\{", css) for s in block.split(",")]
    assert selectors
    assert all(s.startswith(".attn-toolkit") for s in selectors), selectors


def test_section_switch_info_does_not_repeat_the_title(built):
    """The line under each section's switch drops a leading "<method name>: " that the title above already shows;
    the hover help keeps the whole text."""
    _, parts = built
    for tab in TABS:
        for name, sec in parts[tab].sections.items():
            if sec.enabled is None:
                continue
            help_text = S.FIELD_BY_KEY[f"{name}_enabled"].help
            head = help_text.partition(": ")[0]
            if head.lower() in sec.title.lower():
                assert not sec.enabled.info.lower().startswith(head.lower() + ":"), (name, sec.enabled.info)
                assert sec.enabled.info[1:] in help_text
            else:
                assert sec.enabled.info == help_text
            assert parts[tab].help[sec.enabled.elem_id] == help_text
    assert parts["txt2img"].sections["pag"].enabled.info.startswith("Steer away from a prediction")
