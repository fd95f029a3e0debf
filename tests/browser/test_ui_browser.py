"""The accordion in a real browser (Debian's Chromium driven by Playwright).

Two targets, the same checks:

* ``page`` (the default run, CI): ``tests/browser/page.py``, a small WebUI page with A1111's element ids, the
  toolkit's real UI, ``javascript/`` and ``style.css``, and the A1111 double behind Generate and paste.
* ``live`` (marker ``webui``): a real WebUI page at ``ATTN_WEBUI_URL`` (A1111 1.10.1 or Forge 2, started
  without ``--nowebui``, the tiny checkpoint; see docs/testing.md).

Without Chromium (``/usr/bin/chromium``, or ``ATTN_CHROMIUM``) or the ``playwright`` package the tests skip and
say why; under CI (``CI`` set) they fail instead, since ``.ci/run`` installs Chromium.
``ATTN_SCREENSHOTS=DIR`` saves a picture of each tab's accordion and of each method section into DIR.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import time

import pytest

from lib_attn import settings as S
from tests.support.helpers import non_default_settings

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("ATTN_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TABS = ("txt2img", "img2img")
TIMEOUT_MS = int(os.environ.get("ATTN_BROWSER_TIMEOUT_MS", "120000"))  # one generation on a live CPU WebUI
UI_TIMEOUT_MS = 20000  # anything else the page does (an event's round trip)
SHOTS = os.environ.get("ATTN_SCREENSHOTS")
BY_INFOTEXT = {f.infotext: f for f in S.FIELDS}


def _need(what: str, why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what} is needed for the browser tests in CI ({why}); .ci/run installs it")
    pytest.skip(f"browser tests skipped: {what} not available ({why})")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        _need("the playwright package", str(e))
    if not (shutil.which(CHROMIUM) or pathlib.Path(CHROMIUM).exists()):
        _need("Chromium", f"{CHROMIUM} not found; apt-get install chromium")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module", params=["page", pytest.param("live", marks=pytest.mark.webui)])
def site(request):
    """(url, is_live) of the page under test."""
    if request.param == "live":
        yield os.environ.get("ATTN_WEBUI_URL", "http://127.0.0.1:7860").rstrip("/"), True
        return
    from tests.browser import page
    from tests.fakes.a1111_double import a1111_host
    from tests.support.helpers import SCRIPT, assert_no_leftovers

    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        demo = page.build(h)
        url = page.launch(demo)
        try:
            yield url, False
        finally:
            demo.close()
        # every generation the page ran (a failed one included) left no patch, hook or callback behind
        assert_no_leftovers(h)


@pytest.fixture
def ui(browser, site):
    url, live = site
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(UI_TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(url)
    pg.wait_for_selector("#txt2img_prompt textarea")
    pg.wait_for_function("() => window.attentionToolkit !== undefined")
    yield Ui(pg, live)
    context.close()
    assert not [e for e in errors if "attention" in e.lower()], errors


# --------------------------------------------------------------------------------------------
# the page, by the WebUI's element ids
# --------------------------------------------------------------------------------------------
def eid(tab: str, key: str) -> str:
    return f"script_{tab}_attention_toolkit_{key}"


def kind_of(f: S.Field) -> str:
    """The control lib_attn/ui.py makes for a field (make_component)."""
    if f.kind in ("float", "int"):
        return "slider" if f.minimum is not None and f.maximum is not None else "number"
    if f.kind == "choice":
        return "radio" if len(f.choices or ()) <= 4 else "dropdown"
    return {"bool": "bool", "str": "text", "image": "image"}[f.kind]


def shown_sections(tab: str) -> list[str]:
    return [s for s in S.SECTIONS if tab in S.SECTION_TABS.get(s, TABS)]


READ_JS = """(specs) => {
    const root = (typeof gradioApp === "function") ? gradioApp() : document;
    const out = {};
    for (const [id, kind] of specs) {
        const el = root.querySelector('#' + id);
        if (!el) { out[id] = null; continue; }
        let v = null;
        if (kind === "bool") {
            const i = el.querySelector('input[type=checkbox]'); v = i ? i.checked : null;
        } else if (kind === "slider" || kind === "number") {
            const i = el.querySelector('input[type=number]'); v = i ? i.value : null;
        } else if (kind === "radio") {
            const i = el.querySelector('input[type=radio]:checked');
            v = i ? (i.value && i.value !== "on" ? i.value : i.closest('label').textContent.trim()) : null;
        } else if (kind === "dropdown") {
            const i = el.querySelector('input'); v = i ? i.value : null;
        } else if (kind === "text") {
            const i = el.querySelector('textarea, input[type=text]'); v = i ? i.value : null;
        }
        out[id] = v;
    }
    return out;
}"""

VISIBLE_JS = """(id) => {
    const root = (typeof gradioApp === "function") ? gradioApp() : document;
    const el = root.querySelector('#' + id);
    return !!el && el.offsetParent !== null && getComputedStyle(el).display !== "none";
}"""


class Ui:
    def __init__(self, page, live: bool):
        self.page = page
        self.live = live

    # tabs and the accordion
    def tab(self, tab: str) -> None:
        self.page.locator("#tabs button", has_text=re.compile(rf"^\s*{tab}\s*$", re.IGNORECASE)).first.click()
        self.page.wait_for_selector(f"#tab_{tab}", state="visible")

    def visible(self, elem_id: str) -> bool:
        return bool(self.page.evaluate(VISIBLE_JS, elem_id))

    def open_accordion(self, tab: str) -> None:
        self.tab(tab)
        acc = f"#{eid(tab, 'accordion')}"
        first = f"{eid(tab, shown_sections(tab)[0])}_section"
        if not self.visible(first):
            self.page.locator(f"{acc} .label-wrap").first.click()
        self.page.wait_for_function(VISIBLE_JS, arg=first)

    # controls
    def read(self, tab: str, fields) -> dict[str, object]:
        specs = [[eid(tab, f.key), kind_of(f)] for f in fields]
        got = self.page.evaluate(READ_JS, specs)
        return {f.key: got[eid(tab, f.key)] for f in fields}

    def set_checkbox(self, tab: str, key: str, on: bool) -> None:
        box = self.page.locator(f"#{eid(tab, key)} input[type=checkbox]")
        if box.is_checked() != on:
            box.click()
        assert box.is_checked() == on

    def enable(self, tab: str, section: str, on: bool = True) -> None:
        self.set_checkbox(tab, f"{section}_enabled", on)
        body = f"{eid(tab, section)}_body"
        self.page.wait_for_function(f"(id) => ({VISIBLE_JS})(id) === {'true' if on else 'false'}", arg=body)

    def fill(self, tab: str, key: str, value) -> None:
        f = S.FIELD_BY_KEY[key]
        kind = kind_of(f)
        if kind in ("slider", "number"):
            box = self.page.locator(f"#{eid(tab, key)} input[type=number]")
        else:
            box = self.page.locator(f"#{eid(tab, key)} textarea, #{eid(tab, key)} input[type=text]").first
        box.fill(str(value))
        box.press("Tab")

    def upload(self, tab: str, key: str, path: pathlib.Path) -> None:
        root = self.page.locator(f"#{eid(tab, key)}")
        root.locator("input[type=file]").set_input_files(str(path))
        root.locator("img").first.wait_for(state="visible")

    # generation and paste
    def basics(self, tab: str) -> None:
        """On a real WebUI: a small, short generation (its defaults are 512 px, 20 steps)."""
        if not self.live:
            return
        for name, value in (("steps", 3), ("width", 64), ("height", 64)):
            box = self.page.locator(f"#{tab}_{name} input[type=number]")
            if box.count():
                box.first.fill(str(value))
                box.first.press("Tab")

    def start(self, tab: str, prompt: str = "a red cube") -> None:
        """The tab with its accordion open, a small generation (on a real WebUI) and a prompt."""
        self.open_accordion(tab)
        self.basics(tab)
        self.prompt(tab, prompt)

    def prompt(self, tab: str, text: str) -> None:
        box = self.page.locator(f"#{tab}_prompt textarea")
        box.fill(text)

    def generate(self, tab: str) -> tuple[str, str]:
        """Click Generate; returns (infotext under the image, error text).  The infotext is the ``<p>`` that
        ``plaintext_to_html`` writes into ``#html_info_<tab>``; an error is the ``div.error`` in ``#html_log_<tab>``
        (both WebUIs; gradio's own progress text in those blocks is not either)."""
        read = """(tab) => {
            const info = document.querySelector('#html_info_' + tab + ' p');
            const err = document.querySelector('#html_log_' + tab + ' .error');
            return [info ? info.innerText : '', err ? err.innerText : ''];
        }"""
        before = self.page.evaluate(read, tab)
        self.page.evaluate(
            "(tab) => { const e = document.querySelector('#html_log_' + tab + ' .error'); if (e) e.remove(); }", tab
        )
        self.page.locator(f"#{tab}_generate").click()
        self.page.wait_for_function(
            f"([tab, old]) => {{ const [i, e] = ({read})(tab); return e !== '' || (i !== '' && i !== old); }}",
            arg=[tab, before[0]],
            timeout=TIMEOUT_MS,
        )
        info, err = self.page.evaluate(read, tab)
        return ("" if err else info), err

    def paste(self, tab: str, text: str) -> None:
        self.prompt(tab, text)
        self.page.locator(f"#{tab}_tools #paste").click()


def infotext_of(settings_params: dict[str, str], prompt: str = "a red cube") -> str:
    """An infotext as the WebUI writes it (A1111's quoting), with small-generation basics."""

    def quote(text: str) -> str:
        import json

        if "," not in text and "\n" not in text and ":" not in text:
            return text
        return json.dumps(text, ensure_ascii=False)

    params = {"Steps": "3", "Sampler": "Euler", "CFG scale": "5", "Seed": "1", "Size": "64x64", **settings_params}
    return prompt + "\n" + ", ".join(f"{k}: {quote(str(v))}" for k, v in params.items())


def same(f: S.Field, shown, want) -> bool:
    if shown is None:
        return False
    if f.kind == "bool":
        return shown is bool(want)
    if f.kind in ("float", "int"):
        return abs(float(shown) - float(want)) <= 1e-6 * max(1.0, abs(float(want)))
    return str(shown) == str(want)


def shoot(ui: Ui, elem_id: str, name: str) -> None:
    if not SHOTS:
        return
    out = pathlib.Path(SHOTS)
    out.mkdir(parents=True, exist_ok=True)
    ui.page.locator(f"#{elem_id}").screenshot(path=str(out / f"{name}.png"))


def photo(path: pathlib.Path, size=(64, 64), gray: bool = False) -> pathlib.Path:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    rgb = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) * 127 // sum(size)], -1).astype("uint8")
    img = Image.fromarray(rgb)
    (img.convert("L").convert("RGB") if gray else img).save(path)
    return path


# --------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tab", TABS)
def test_sections_show_and_hide_with_their_switch_and_every_control_has_hover_help(ui, tab):
    ui.open_accordion(tab)
    shoot(ui, eid(tab, "accordion"), f"ui_{tab}")
    for section in shown_sections(tab):
        body = f"{eid(tab, section)}_body"
        assert ui.visible(f"{eid(tab, section)}_section"), section
        assert not ui.visible(body), f"{section}: body shown while its switch is off"
        ui.enable(tab, section, True)
        assert ui.visible(body), section
        fields = list(S.fields_of(section))
        # hover help: the JS sets each control's title from settings.py's help text
        ui.page.wait_for_function(
            "(ids) => ids.every(([id, t]) => { const el = document.querySelector('#' + id); return el && el.title === t; })",
            arg=[[eid(tab, f.key), f.help] for f in fields],
            timeout=10000,
        )
        if tab == S.SECTION_TABS.get(section, TABS)[0]:
            shoot(ui, f"{eid(tab, section)}_section", f"ui_{section}")
        ui.enable(tab, section, False)
        assert not ui.visible(body), section
    for section in set(S.SECTIONS) - set(shown_sections(tab)):
        assert not ui.visible(f"{eid(tab, section)}_section"), f"{section} shown in {tab}"


def test_generation_with_pag_writes_its_infotext_and_pasting_it_restores_every_control(ui):
    tab = "txt2img"
    ui.start(tab)
    ui.enable(tab, "pag")
    ui.fill(tab, "pag_scale", 2.5)
    info, err = ui.generate(tab)
    assert not err, err
    assert "PAG scale: 2.5" in info, info
    assert ui.page.locator(f"#{tab}_gallery img").count() >= 1

    # every control of this tab from one pasted infotext
    chosen = non_default_settings()
    want = chosen.values()
    ui.paste(tab, infotext_of(chosen.to_infotext()))
    fields = [f for s in shown_sections(tab) for f in S.fields_of(s) if f.kind != "image"]
    ui.page.wait_for_function(
        "(id) => { const i = document.querySelector('#' + id + ' input[type=checkbox]'); return i && i.checked; }",
        arg=eid(tab, f"{shown_sections(tab)[-1]}_enabled"),
    )
    deadline = time.time() + 10
    while True:
        shown = ui.read(tab, fields)
        bad = {f.key: (shown[f.key], want[f.key]) for f in fields if not same(f, shown[f.key], want[f.key])}
        if not bad or time.time() > deadline:
            break
        time.sleep(0.3)
    assert not bad, bad

    # a control missing from the infotext goes back to its default: paste PAG's entries only
    pag_only = {k: v for k, v in chosen.to_infotext().items() if BY_INFOTEXT[k].section == "pag"}
    ui.paste(tab, infotext_of(pag_only))
    others = [s for s in shown_sections(tab) if s != "pag"]
    ui.page.wait_for_function(
        "(id) => { const i = document.querySelector('#' + id + ' input[type=checkbox]'); return i && !i.checked; }",
        arg=eid(tab, f"{others[-1]}_enabled"),
    )
    for section in others:
        ui.page.wait_for_function(f"(id) => !({VISIBLE_JS})(id)", arg=f"{eid(tab, section)}_body", timeout=10000)
        ui.enable(tab, section, True)  # shows the body: its controls hold their defaults again
        fields = [f for f in S.fields_of(section) if f.kind != "image"]
        shown = ui.read(tab, fields)
        bad = {f.key: shown[f.key] for f in fields if not same(f, shown[f.key], f.default if f.name != "enabled"
                                                              else True)}
        assert not bad, (section, bad)
        ui.enable(tab, section, False)
    pag = [f for f in S.fields_of("pag")]
    shown = ui.read(tab, pag)
    assert all(same(f, shown[f.key], want[f.key]) for f in pag), shown


def test_send_to_img2img_fills_the_toolkit_controls(ui):
    ui.start("txt2img")
    ui.enable("txt2img", "pag")
    ui.fill("txt2img", "pag_scale", 4.5)
    ui.fill("txt2img", "pag_layers", "middle, output.4")
    info, err = ui.generate("txt2img")
    assert not err and "PAG scale: 4.5" in info, (info, err)
    ui.page.locator("#txt2img_send_to_img2img").click()
    ui.page.wait_for_selector("#tab_img2img", state="visible")
    ui.open_accordion("img2img")
    ui.page.wait_for_function(VISIBLE_JS, arg=f"{eid('img2img', 'pag')}_body")
    shown = ui.read("img2img", [S.FIELD_BY_KEY[k] for k in ("pag_enabled", "pag_scale", "pag_layers")])
    assert shown["pag_enabled"] is True
    assert float(shown["pag_scale"]) == 4.5
    assert shown["pag_layers"] == "middle, output.4"


def test_reference_images_upload_and_generate(ui, tmp_path):
    # style reference (txt2img)
    ui.start("txt2img")
    ui.enable("txt2img", "style")
    ui.upload("txt2img", "style_reference", photo(tmp_path / "style.png"))
    info, err = ui.generate("txt2img")
    assert not err, err
    assert S.FIELD_BY_KEY["style_strength"].infotext in info, info

    # reference colorization (img2img): a grayscale input, a colour reference
    ui.start("img2img")
    ui.page.locator("#img2img_image input[type=file]").first.set_input_files(str(photo(tmp_path / "g.png", gray=True)))
    ui.page.locator("#img2img_image img").first.wait_for(state="visible")
    ui.enable("img2img", "colorize")
    ui.upload("img2img", "colorize_reference", photo(tmp_path / "ref.png"))
    info, err = ui.generate("img2img")
    assert not err, err
    assert S.FIELD_BY_KEY["colorize_strength"].infotext in info, info


def test_a_bad_value_shows_its_message_and_the_page_keeps_working(ui):
    tab = "txt2img"
    ui.start(tab)
    ui.enable(tab, "pag")
    ui.fill(tab, "pag_layers", "output.99")
    _, err = ui.generate(tab)
    assert "Attention Toolkit" in err and "pag.layers" in err and "matched no layer" in err, err
    ui.fill(tab, "pag_layers", "middle")
    info, err = ui.generate(tab)
    assert not err, err
    assert "PAG layers: middle" in info, info
