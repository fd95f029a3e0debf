"""Against a real, running WebUI (A1111 or Forge) with this extension installed, through its HTTP API.

Not part of the default run (marker ``webui``).  Start the WebUI with ``--api`` and any SD1.x/SD2.x/SDXL
checkpoint, then:

    ATTN_WEBUI_URL=http://127.0.0.1:7860 bash tests/run.sh -m webui

A WebUI started with ``--nowebui`` (API only, port 7861) runs the same checks, plus the API-only one
(``ATTN_WEBUI_NOWEBUI=1`` makes that one required rather than skipped when the server says it has a UI).

Each check talks to the WebUI as a user's script would: ``alwayson_scripts`` with the named and the
positional form, bad input, hires fix, img2img with a mask, and "off" equal to no extension.  Seeds are
fixed and the checks compare decoded pixels, so they hold on any deterministic backend (CPU).
"""

from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from lib_attn import settings as S

pytestmark = pytest.mark.webui

URL = os.environ.get("ATTN_WEBUI_URL", "http://127.0.0.1:7860").rstrip("/")
TITLE = "Attention Toolkit"
SIZE = int(os.environ.get("ATTN_WEBUI_SIZE", "128"))
BASE = {"prompt": "a red cube on a table", "negative_prompt": "blurry", "seed": 123, "steps": 4, "cfg_scale": 5.0,
        "width": SIZE, "height": SIZE, "sampler_name": "Euler", "batch_size": 1}


def call(path: str, payload: dict | None = None, timeout: float = 600) -> tuple[int, dict]:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(URL + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"raw": body.decode(errors="replace")}


@pytest.fixture(scope="module", autouse=True)
def webui():
    try:
        status, _ = call("/sdapi/v1/sd-models", timeout=10)
    except OSError as e:
        pytest.skip(f"no WebUI at {URL}: {e}")
    assert status == 200


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1]))).convert("RGB"), dtype=np.int16)


def txt2img(args=None, **kw):
    payload = {**BASE, **kw}
    if args is not None:
        payload["alwayson_scripts"] = {TITLE: {"args": args}}
    return call("/sdapi/v1/txt2img", payload)


def ok(resp: tuple[int, dict]) -> dict:
    status, body = resp
    assert status == 200, body
    return body


def infotext(body: dict) -> str:
    return json.loads(body["info"])["infotexts"][0]


def encode(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def xyz_args(axes: list[tuple[str, str]]) -> list:
    """The X/Y/Z plot's txt2img script args for ``axes`` (``[(axis label, values)]`` for X, then Y and Z) in this
    WebUI's order: its script-info defaults, the axes, "Draw legend" and "Include Sub Images" on (the WebUIs add
    options: reForge has 21, A1111 18)."""
    info = ok(call("/sdapi/v1/script-info"))
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    choices = xyz["args"][0]["choices"]
    args = [a.get("value") for a in xyz["args"]]
    for i in range(3):
        label, values = axes[i] if i < len(axes) else ("Nothing", "")
        args[3 * i : 3 * i + 3] = [choices.index(label), values, []]
    for i, a in enumerate(xyz["args"]):
        if a["label"] in ("Draw legend", "Include Sub Images"):
            args[i] = True
    return args


def test_script_is_listed_for_both_tabs():
    body = ok(call("/sdapi/v1/scripts"))
    assert TITLE.lower() in body["txt2img"] and TITLE.lower() in body["img2img"]
    info = ok(call("/sdapi/v1/script-info"))
    ours = [s for s in info if s["name"] == TITLE.lower()]
    assert {s["is_img2img"] for s in ours} == {False, True}
    labels = [a["label"] for a in ours[0]["args"]]
    assert len(labels) >= len(S.FIELDS), labels


def test_off_is_identical_to_no_extension_and_pag_changes_the_image():
    plain = ok(txt2img())
    off = ok(txt2img([{"pag": {"enabled": False}}]))
    positional_off = ok(txt2img(S.defaults().to_args()))
    assert np.array_equal(pixels(plain["images"][0]), pixels(off["images"][0]))
    assert np.array_equal(pixels(plain["images"][0]), pixels(positional_off["images"][0]))
    assert "PAG" not in infotext(off)

    pag = ok(txt2img([{"pag": {"scale": 3.0, "layers": "middle"}}]))
    text = infotext(pag)
    assert "PAG scale: 3" in text and "PAG layers: middle" in text, text
    assert np.abs(pixels(pag["images"][0]) - pixels(plain["images"][0])).max() > 0


PAG_EXTENSION = "Perturbed-Attention Guidance"  # sd-perturbed-attention's script (Forge, reForge)
# its 16 positional args: enabled, scale, rescale, rescale mode, adaptive scale, block, block id, block list, hires
# override, hires CFG, hires scale, hires rescale, hires rescale mode, hires adaptive scale, sigma start, sigma end
PAG_EXTENSION_ARGS = [True, 3.0, 0.0, "full", 0.0, "middle", 0, "", False, 7.0, 3.0, 0.0, "full", 0.0, -1.0, -1.0]


def test_pag_equals_sd_perturbed_attention_where_it_is_installed():
    """On a WebUI with sd-perturbed-attention installed (reForge's PAG; docs/forks.md), its PAG and ours give the same
    pixels at the same settings: scale 3 on the middle block, no adaptive scale, rescale or sigma window."""
    if PAG_EXTENSION.lower() not in ok(call("/sdapi/v1/scripts"))["txt2img"]:
        pytest.skip("sd-perturbed-attention is not installed in this WebUI")
    for kw in ({"sampler_name": "Euler"}, {"sampler_name": "DPM++ 2M", "batch_size": 2, "steps": 6}):
        theirs = ok(
            call("/sdapi/v1/txt2img", {**BASE, **kw, "alwayson_scripts": {PAG_EXTENSION: {"args": PAG_EXTENSION_ARGS}}})
        )
        ours = ok(txt2img([{"pag": {"scale": 3.0, "layers": "middle"}}], **kw))
        plain = ok(txt2img(**kw))
        assert len(theirs["images"]) == len(ours["images"]) == kw.get("batch_size", 1)
        for a, b, c in zip(theirs["images"], ours["images"], plain["images"], strict=True):
            assert np.array_equal(pixels(a), pixels(b)), np.abs(pixels(a) - pixels(b)).max()
            assert np.abs(pixels(b) - pixels(c)).max() > 0


def test_named_flat_and_positional_forms_agree():
    values = {"pag_enabled": True, "pag_scale": 2.0, "pag_start": 0.0, "pag_end": 0.75, "pag_layers": "middle"}
    named = ok(txt2img([{"pag": {"scale": 2.0, "end": 0.75, "layers": "middle"}}]))
    flat = ok(txt2img([{"pag_scale": 2.0, "pag.end": 0.75}]))
    positional = ok(txt2img(S.defaults().with_values(values).to_args()))
    ref = pixels(named["images"][0])
    assert np.array_equal(ref, pixels(flat["images"][0]))
    assert np.array_equal(ref, pixels(positional["images"][0]))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([{"pag": {"scale": 99}}], "PAG scale (pag.scale)"),
        ([{"pag": {"scale": "strong"}}], "PAG scale (pag.scale)"),
        ([{"pag": {"layers": "output.99"}}], "(pag.layers): 'output.99' matched no layer"),
        ([{"pag": {"hires": "sometimes"}}], "(pag.hires)"),
        ([{"pag": {"sclae": 2}}], "pag_scale"),
    ],
)
def test_bad_input_names_the_field_and_the_webui_keeps_serving(args, fragment):
    status, body = txt2img(args)
    assert status >= 400, body
    assert fragment in json.dumps(body), body
    ok(txt2img())


def test_hires_fix_modes():
    hr = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5, hr_second_pass_steps=2,
              hr_additional_modules=["Use same choices"])  # Forge's API fails without it; A1111 ignores it
    plain = pixels(ok(txt2img(**hr))["images"][0])
    same = ok(txt2img([{"pag": {"scale": 3.0}}], **hr))
    own = ok(txt2img([{"pag": {"scale": 3.0, "hires": "own", "hires_scale": 1.0}}], **hr))
    off = ok(txt2img([{"pag": {"scale": 3.0, "hires": "off"}}], **hr))
    assert "PAG hires: own" in infotext(own) and "PAG hires scale: 1" in infotext(own)
    size = round(SIZE * 1.5) // 8 * 8
    images = [pixels(b["images"][0]) for b in (same, own, off)]
    assert all(im.shape[:2] == (size, size) for im in images)
    assert len({im.tobytes() for im in [plain, *images]}) == 4  # every mode gives its own result


def test_img2img_with_mask():
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, : SIZE // 2] = 255
    payload = {**BASE, "init_images": [encode(init)], "mask": encode(Image.fromarray(mask)), "denoising_strength": 0.6,
               "inpainting_fill": 1, "inpaint_full_res": False, "mask_blur": 0}
    plain = pixels(ok(call("/sdapi/v1/img2img", payload))["images"][0])
    pag = ok(call("/sdapi/v1/img2img", {**payload, "alwayson_scripts": {TITLE: {"args": [{"pag": {"scale": 3}}]}}}))
    out = pixels(pag["images"][0])
    assert "PAG scale: 3" in infotext(pag)
    assert np.abs(out[:, : SIZE // 2 - 8] - plain[:, : SIZE // 2 - 8]).max() > 0  # masked half regenerated


def test_batch_and_repeat_give_the_same_result_as_a_fresh_call():
    first = ok(txt2img([{"pag": {"scale": 3}}], batch_size=2))
    txt2img([{"pag": {"scale": 99}}])  # a failed generation in between
    again = ok(txt2img([{"pag": {"scale": 3}}], batch_size=2))
    for a, b in zip(first["images"], again["images"], strict=True):
        assert np.array_equal(pixels(a), pixels(b))


def test_xyz_plot_axis():
    """X/Y/Z plot with ``[Attention] PAG scale`` as X axis: each cell equals the same settings run alone."""
    args = xyz_args([("[Attention] PAG scale", "0, 2.5")])
    body = ok(call("/sdapi/v1/txt2img", {**BASE, "script_name": "x/y/z plot", "script_args": args}))
    cells = [pixels(b) for b in body["images"][1:3]]  # [grid, cell 0, cell 1]
    plain = pixels(ok(txt2img())["images"][0])
    pag = pixels(ok(txt2img([{"pag": {"scale": 2.5}}]))["images"][0])
    assert np.array_equal(cells[0], plain)
    assert np.array_equal(cells[1], pag)
    assert "PAG scale: 2.5" in json.loads(body["info"])["infotexts"][2]


def test_api_only_server_lists_and_runs_the_xyz_axes():
    """``--nowebui`` builds the script runners inside the API before the ``on_before_ui`` callbacks: every axis must
    still be listed once for its tabs (script-info) and run through the API."""
    flags = ok(call("/sdapi/v1/cmd-flags"))
    if os.environ.get("ATTN_WEBUI_NOWEBUI") == "1":
        assert flags.get("nowebui"), "ATTN_WEBUI_NOWEBUI=1 but the WebUI was not started with --nowebui"
    elif not flags.get("nowebui"):
        pytest.skip("the WebUI has a UI (no --nowebui)")
    info = ok(call("/sdapi/v1/script-info"))
    for tab in ("txt2img", "img2img"):
        xyz = next(s for s in info if s["name"] == "x/y/z plot" and s["is_img2img"] == (tab == "img2img"))
        ours = [c for c in xyz["args"][0]["choices"] if c.startswith(S.XYZ_PREFIX)]
        assert ours == [S.XYZ_PREFIX + f.infotext for f in S.FIELDS
                        if f.kind != "image" and tab in S.SECTION_TABS.get(f.section, (tab,))]
    args = xyz_args([("[Attention] PAG scale", "1.5, 3")])
    body = ok(call("/sdapi/v1/txt2img", {**BASE, "script_name": "x/y/z plot", "script_args": args}))
    texts = json.loads(body["info"])["infotexts"]  # [grid, cell 0, cell 1]
    assert "PAG scale: 1.5" in texts[1] and "PAG scale: 3" in texts[2], texts


def test_infotext_parses_back_through_the_webui():
    """The WebUI's own infotext parser (``/sdapi/v1/png-info``) gives back every value the UI restores."""
    values = {"pag_enabled": True, "pag_scale": 2.5, "pag_adaptive_scale": 0.001, "pag_start": 0.1, "pag_end": 0.9,
              "pag_layers": "middle, output.3", "pag_hires": "own", "pag_hires_scale": 1.25}
    body = ok(txt2img([values]))
    parsed = ok(call("/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][0]}))["parameters"]
    restored = S.defaults().with_values(S.from_infotext({k: str(v) for k, v in parsed.items()}))
    assert restored == S.defaults().with_values(values)


def _photo(name: str, size: tuple[int, int] | None = None) -> Image.Image:
    import gradio

    img = Image.open(pathlib.Path(gradio.__file__).parent / "test_data" / name).convert("RGB")
    return img.resize(size) if size else img


def test_reference_colorization_in_img2img():
    from lib_attn import color

    src = _photo("cheetah1.jpg", (SIZE + 40, SIZE + 24))  # not the generation size: the output takes its size
    payload = {**BASE, "init_images": [encode(src)], "denoising_strength": 0.5,
               "alwayson_scripts": {TITLE: {"args": [{"colorize": {"reference": "data:image/png;base64,"
                                                                                + encode(_photo("lion.jpg"))}}]}}}
    body = ok(call("/sdapi/v1/img2img", payload))
    out = Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")
    assert out.size == src.size
    lab_in, lab_out = (color.rgb_to_lab(color.pil_to_tensor(im)).numpy() for im in (src, out))
    mse = float(np.mean((lab_in[0] - lab_out[0]) ** 2))
    assert 10 * np.log10(100.0**2 / max(mse, 1e-12)) >= 45.0  # the input's lightness is kept
    assert np.abs(lab_out[1:]).mean() > 1.0  # and it has colour
    assert "Colorize guidance: 10" in infotext(body) and "Colorize reference scale: 0.5" in infotext(body)
    # full-size reference streams and CFG 1 with an empty prompt (the uncond rows as the plain rows on A1111)
    full = {**payload, "prompt": "", "negative_prompt": "", "cfg_scale": 1, "alwayson_scripts": {TITLE: {"args": [
        {"colorize": {"reference": encode(_photo("lion.jpg")), "reference_scale": 1}}]}}}
    body = ok(call("/sdapi/v1/img2img", full))
    assert "Colorize reference scale: 1" in infotext(body)
    bad = {**payload, "alwayson_scripts": {TITLE: {"args": [{"colorize": {"reference": "not base64!"}}]}}}
    status, err = call("/sdapi/v1/img2img", bad)
    assert status >= 400 and "(colorize.reference)" in json.dumps(err)
    status, err = txt2img([{"colorize": {"reference": encode(_photo("lion.jpg"))}}])
    assert status >= 400 and "works in img2img" in json.dumps(err)


def test_reference_colorization_paper_regime():
    """The paper's regime through the API: the output keeps the input's lightness and has colour, the infotext
    records the regime and its passes and pastes back; a mask or a timestep sampler is refused naming
    colorize.paper; the WebUI keeps serving."""
    from lib_attn import color

    src = _photo("cheetah1.jpg", (SIZE, SIZE))
    ref = "data:image/png;base64," + encode(_photo("lion.jpg"))
    payload = {**BASE, "prompt": "", "negative_prompt": "", "init_images": [encode(src)], "denoising_strength": 0.5,
               "alwayson_scripts": {TITLE: {"args": [{"colorize": {"reference": ref, "paper": True, "passes": 2}}]}}}
    body = ok(call("/sdapi/v1/img2img", payload))
    out = Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")
    lab_in, lab_out = (color.rgb_to_lab(color.pil_to_tensor(im)).numpy() for im in (src, out))
    mse = float(np.mean((lab_in[0] - lab_out[0]) ** 2))
    assert 10 * np.log10(100.0**2 / max(mse, 1e-12)) >= 45.0
    assert np.abs(lab_out[1:]).mean() > 1.0
    text = infotext(body)
    assert "Colorize paper: True" in text and "Colorize passes: 2" in text
    parsed = ok(call("/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][0]}))
    assert parsed["parameters"].get("Colorize passes") in ("2", 2)
    status, err = call("/sdapi/v1/img2img", {**payload, "sampler_name": "DDIM"})
    assert status >= 400 and "(colorize.paper)" in json.dumps(err)
    status, err = call("/sdapi/v1/img2img", {**payload, "mask": encode(src.convert("L"))})
    assert status >= 400 and "(colorize.paper)" in json.dumps(err)
    ok(call("/sdapi/v1/img2img", {**payload, "alwayson_scripts": {}}))


def test_style_reference():
    """Style reference through the API: txt2img (the image changes, infotext records it, a plain run afterwards is
    identical to one before), img2img with the content loss, hires fix with the style in both passes, an XYZ axis
    on its strength with the style image given to the AlwaysOn script, and a bad style request."""
    plain = pixels(ok(txt2img())["images"][0])
    style = {"reference": "data:image/png;base64," + encode(_photo("lion.jpg", (96, 96))), "iters": 1}
    body = ok(txt2img([{"style": style}]))
    assert not np.array_equal(pixels(body["images"][0]), plain)
    text = infotext(body)
    assert "Style strength: 0.04" in text and "Style iters: 1" in text
    assert "Style AdaIN on: noisy" in text and "Style pairing: all" in text
    assert np.array_equal(pixels(ok(txt2img())["images"][0]), plain)
    # the paper's options: two style images attended together (any count), the AdaIN on the denoised prediction
    two = [style["reference"], "data:image/png;base64," + encode(_photo("cheetah1.jpg", (96, 96)))]
    both = ok(txt2img([{"style": {**style, "reference": two}}]))
    assert not np.array_equal(pixels(both["images"][0]), pixels(body["images"][0]))
    den = ok(txt2img([{"style": {**style, "adain_mode": "denoised"}}]))
    assert "Style AdaIN on: denoised" in infotext(den)
    assert not np.array_equal(pixels(den["images"][0]), pixels(body["images"][0]))
    status, err = txt2img([{"style": {**style, "reference": two * 2, "pairing": "each"}}], batch_size=3)
    assert status >= 400 and "(style.reference)" in json.dumps(err)
    init = encode(_photo("cheetah1.jpg", (SIZE, SIZE)))
    i2i = {**BASE, "init_images": [init], "denoising_strength": 0.6}
    a = ok(call("/sdapi/v1/img2img", {**i2i, "alwayson_scripts": {TITLE: {"args": [{"style": {**style,
                                                                                          "content_weight": 0}}]}}}))
    b = ok(call("/sdapi/v1/img2img", {**i2i, "alwayson_scripts": {TITLE: {"args": [{"style": {**style,
                                                                                          "content_weight": 2}}]}}}))
    assert not np.array_equal(pixels(a["images"][0]), pixels(b["images"][0]))
    hr = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5, hr_second_pass_steps=2,
              hr_additional_modules=["Use same choices"])
    assert "Style hires: same" in infotext(ok(txt2img([{"style": {**style, "hires": "same"}}], **hr)))
    args = xyz_args([("[Attention] Style strength", "0.05, 0.2")])
    grid = ok(call("/sdapi/v1/txt2img", {**BASE, "script_name": "x/y/z plot", "script_args": args,
                                         "alwayson_scripts": {TITLE: {"args": [{"style": style}]}}}))
    for cell, strength in zip(grid["images"][1:3], (0.05, 0.2), strict=True):
        alone = ok(txt2img([{"style": {**style, "strength": strength}}]))
        assert np.array_equal(pixels(cell), pixels(alone["images"][0]))
    status, err = txt2img([{"style": {"iters": 0}}])
    assert status >= 400 and "(style.iters)" in json.dumps(err)
    status, err = txt2img([{"style": {}}])
    assert status >= 400 and "(style.reference)" in json.dumps(err)


def test_style_transfer_by_optimization():
    """Style mode transfer (the paper's style transfer) through the API: img2img returns the optimized init image
    (it is far from a plain img2img, the infotext records the mode and pastes back), and txt2img or a timestep
    sampler are refused naming style.mode."""
    style = {"reference": "data:image/png;base64," + encode(_photo("lion.jpg", (96, 96))), "mode": "transfer"}
    init = encode(_photo("cheetah1.jpg", (SIZE, SIZE)))
    i2i = {**BASE, "init_images": [init], "denoising_strength": 1.0, "steps": 6}

    def run(args, **kw):
        return call("/sdapi/v1/img2img", {**i2i, **kw, "alwayson_scripts": {TITLE: {"args": args}}})

    def mean_diff(a, b):
        return float(np.abs(a.astype(float) - b.astype(float)).mean())

    # img2img of the random-weight test checkpoint is not repeatable (its VAE samples the init latent with the
    # global RNG), so the transfer is told from plain img2img by how far apart the images are
    plain, plain2 = (pixels(ok(run([]))["images"][0]) for _ in range(2))
    body = ok(run([{"style": style}]))
    out = pixels(body["images"][0])
    assert mean_diff(out, plain) > 2 * mean_diff(plain2, plain) + 1
    text = infotext(body)
    assert "Style mode: transfer" in text and "Style transfer lr: 0.05" in text
    parsed = ok(call("/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][0]}))
    assert parsed["parameters"].get("Style mode") == "transfer"
    status, err = txt2img([{"style": style}])
    assert status >= 400 and "(style.mode)" in json.dumps(err)
    status, err = run([{"style": style}], sampler_name="DDIM")
    assert status >= 400 and "(style.mode)" in json.dumps(err)
    ok(run([]))  # the WebUI keeps serving


def test_edit_mask():
    """The automatic edit mask through the API: the mask comes back as an extra image at the output size, its
    infotext pastes back through the WebUI's own parser, the mask is accepted as the mask of a follow-up inpainting
    run, and bad requests name their field."""
    init = encode(_photo("cheetah1.jpg", (SIZE, SIZE)))
    i2i = {**BASE, "prompt": "a tiger", "init_images": [init], "denoising_strength": 0.7, "batch_size": 2}
    body = ok(call("/sdapi/v1/img2img", {**i2i, "alwayson_scripts": {TITLE: {"args": [{"edit_mask": {"blur": 0}}]}}}))
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in body["images"]]
    masks = [im for im in images if im.mode == "L"]
    assert len(masks) == 2 and all(m.size == (SIZE, SIZE) for m in masks), [im.mode for im in images]
    text = infotext(body)
    assert "Edit mask threshold: 0.2" in text
    parsed = ok(call("/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][0]}))
    assert parsed["parameters"].get("Edit mask blur") in ("0", 0)
    plain = ok(call("/sdapi/v1/img2img", {**i2i, "batch_size": 1}))
    follow = ok(call("/sdapi/v1/img2img", {**i2i, "batch_size": 1, "mask": body["images"][-1]}))
    assert len(follow["images"]) == 1 and not np.array_equal(pixels(follow["images"][0]), pixels(plain["images"][0]))
    one = {**i2i, "batch_size": 1}
    blend = ok(call("/sdapi/v1/img2img", {**one, "alwayson_scripts": {TITLE: {"args": [{"edit_mask": {}}]}}}))
    inpaint = ok(call("/sdapi/v1/img2img", {**one, "alwayson_scripts": {TITLE: {"args": [{"edit_mask": {
        "final": "inpaint"}}]}}}))
    assert len(inpaint["images"]) == 2 and "Edit mask final: inpaint" in infotext(inpaint)
    assert not np.array_equal(pixels(inpaint["images"][0]), pixels(blend["images"][0]))
    status, err = call("/sdapi/v1/img2img", {**i2i, "alwayson_scripts": {TITLE: {"args": [{"edit_mask": {
        "words": "dog"}}]}}})
    assert status >= 400 and "(edit_mask.words)" in json.dumps(err)
    status, err = txt2img([{"edit_mask": {}}])
    assert status >= 400 and "(edit_mask.enabled)" in json.dumps(err)


def test_edit_mask_final_render_with_another_checkpoint():
    """Final pass inpaint with a checkpoint of the WebUI's list (any second checkpoint; the paper's is an inpainting
    one): the request succeeds, the infotext names it, the WebUI's selected checkpoint is the same afterwards and a
    plain txt2img is pixel-identical to one before (the generation's own model is back); an unknown name is an
    HTTP error naming edit_mask.inpaint_model.  Skipped where the WebUI lists one checkpoint only."""
    models = ok(call("/sdapi/v1/sd-models"))
    selected = ok(call("/sdapi/v1/options"))["sd_model_checkpoint"]
    others = [m["title"] for m in models if m["title"] != selected]
    if not others:
        pytest.skip("the WebUI lists one checkpoint only")
    before = pixels(ok(txt2img())["images"][0])
    init = encode(_photo("cheetah1.jpg", (SIZE, SIZE)))
    i2i = {**BASE, "prompt": "a tiger", "init_images": [init], "denoising_strength": 0.7, "batch_size": 2}
    args = [{"edit_mask": {"final": "inpaint", "inpaint_model": others[0], "blur": 0}}]
    body = ok(call("/sdapi/v1/img2img", {**i2i, "alwayson_scripts": {TITLE: {"args": args}}}))
    assert len(body["images"]) == 4  # two results, two masks
    assert f"Edit mask inpaint model: {others[0]}" in infotext(body)
    assert ok(call("/sdapi/v1/options"))["sd_model_checkpoint"] == selected
    assert np.array_equal(pixels(ok(txt2img())["images"][0]), before)
    bad = [{"edit_mask": {"final": "inpaint", "inpaint_model": "no-such-model.safetensors"}}]
    status, err = call("/sdapi/v1/img2img", {**i2i, "alwayson_scripts": {TITLE: {"args": bad}}})
    assert status >= 400 and "(edit_mask.inpaint_model)" in json.dumps(err)


def test_masked_upscaling_in_the_hires_pass_and_img2img():
    """Masked upscaling through the API with hires fix on (latent and image upscalers) and in an img2img upscale: the
    UNet source always; DINO when ``ATTN_WEBUI_DINO=1`` says the WebUI has ``models/dino/dino-vits8`` (else its
    offline failure must name ``yoda.source``).  Previews come back at the output height, infotext pastes back, the
    result differs from plain hires fix, and bad requests name their field."""
    hires = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "hr_second_pass_steps": 4,
             "hr_additional_modules": ["Use same choices"]}  # Forge's API fails without it; A1111 ignores it
    for upscaler in ("Latent", "Lanczos"):
        kw = {**hires, "hr_upscaler": upscaler, "batch_size": 2}
        plain = ok(txt2img(**kw))
        body = ok(txt2img([{"yoda": {"source": "unet", "show": True, "start_coverage": 0.2}}], **kw))
        images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in body["images"]]
        previews = [im for im in images if im.mode == "L"]
        out = int(SIZE * 1.5)
        assert len(previews) == 2 and all(p.size[1] == out and p.size[0] > 2 * out for p in previews)
        assert not np.array_equal(pixels(body["images"][0]), pixels(plain["images"][0]))
        assert "YODA start coverage: 0.2" in infotext(body)
    parsed = ok(call("/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][0]}))
    assert parsed["parameters"].get("YODA source") == "unet"
    init = encode(_photo("cheetah2.jpg", (SIZE // 2, SIZE // 2)))
    i2i = {**BASE, "init_images": [init], "denoising_strength": 0.5}
    body = ok(call("/sdapi/v1/img2img", {**i2i, "alwayson_scripts": {TITLE: {"args": [{"yoda": {"source": "unet"}}]}}}))
    assert len(body["images"]) == 1
    dino = [{"yoda": {"source": "dino-vits8", "show": True}}]
    if os.environ.get("ATTN_WEBUI_DINO") == "1":
        body = ok(txt2img(dino, **hires, hr_upscaler="Latent"))
        assert len(body["images"]) == 2 and "YODA source: dino-vits8" in infotext(body)
    else:
        status, err = txt2img(dino, **hires, hr_upscaler="Latent")
        assert status >= 400 and "(yoda.source)" in json.dumps(err) and "dino-vits8" in json.dumps(err)
    status, err = txt2img([{"yoda": {"source": "unet"}}])  # no hires fix
    assert status >= 400 and "(yoda.enabled)" in json.dumps(err)
    status, err = txt2img([{"yoda": {"start_coverage": 2}}], **hires, hr_upscaler="Latent")
    assert status >= 400 and "(yoda.start_coverage)" in json.dumps(err)


def _server_rss_mb() -> float | None:
    pid = os.environ.get("ATTN_WEBUI_PID")
    if not pid:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def test_soak_through_the_api():
    """``ATTN_LIVE_SOAK`` (default 20) random generations: PAG settings, sizes, samplers, batches, hires fix,
    img2img with reference colorization, style reference, and bad requests in between.  Afterwards plain and PAG generations equal
    those made before (nothing installed is left, no state carried over); with ``ATTN_WEBUI_PID`` set the server's
    memory must stay flat after a warm-up (half the run; a fresh WebUI grows for its first ~100
    generations of new shapes with or without the extension)."""
    import random

    count = int(os.environ.get("ATTN_LIVE_SOAK", "20"))
    rng = random.Random(99)
    ref_pag = [{"pag": {"scale": 2.5}}]
    before = [pixels(ok(txt2img())["images"][0]), pixels(ok(txt2img(ref_pag))["images"][0])]
    lion = encode(_photo("lion.jpg", (64, 64)))
    init = encode(_photo("cheetah1.jpg", (SIZE, SIZE)))
    samplers = ["Euler", "Euler a", "DPM++ 2M", "DDIM", "Heun"]
    rss0 = None
    bad = 0
    for i in range(count):
        size = rng.choice([SIZE, SIZE + 8, SIZE - 8])
        kw = {**BASE, "seed": i, "width": size, "height": rng.choice([SIZE, SIZE + 16]),
              "sampler_name": rng.choice(samplers), "batch_size": rng.choice([1, 2]), "steps": rng.choice([2, 3])}
        roll = rng.random()
        if roll < 0.15:  # a bad request
            status, _ = txt2img([{"pag": {"scale": rng.choice([-1, 99, "x"])}}], **kw)
            assert status >= 400
            bad += 1
            continue
        if roll < 0.25:
            args = [{"style": {"reference": lion, "iters": 1, "strength": rng.choice([0.05, 0.2]),
                               "checkpointing": rng.choice(["auto", "off"])}}]  # "on" is refused on Forge
            ok(txt2img(args, **kw))
        elif roll < 0.4:
            args = [{"colorize": {"reference": lion, "guidance": rng.choice([1.0, 10.0])},
                     **({"pag": {"scale": 2.0}} if rng.random() < 0.5 else {})}]
            body = {**kw, "init_images": [init], "denoising_strength": 0.5,
                    "alwayson_scripts": {TITLE: {"args": args}}}
            ok(call("/sdapi/v1/img2img", body))
        else:
            args = [{"pag": {"scale": rng.choice([0.0, 1.0, 3.0]), "layers": rng.choice(["middle", "all", "output"]),
                             "hires": rng.choice(["same", "own", "off"]), "end": rng.choice([1.0, 0.5])}}]
            if rng.random() < 0.3:
                kw.update(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5,
                          hr_second_pass_steps=2, hr_additional_modules=["Use same choices"])
            ok(txt2img(args, **kw))
        if i + 1 == max(1, count // 2):
            rss0 = _server_rss_mb()
    after = [pixels(ok(txt2img())["images"][0]), pixels(ok(txt2img(ref_pag))["images"][0])]
    assert np.array_equal(before[0], after[0]), "plain generation changed: something stayed installed"
    assert np.array_equal(before[1], after[1]), "PAG generation changed: state carried over"
    rss1 = _server_rss_mb()
    if rss0 is not None and rss1 is not None:
        print(f"server RSS growth after warm-up: {rss1 - rss0:+.1f} MB over {count} generations ({bad} bad)")
        assert rss1 - rss0 < 50


def _scale_of(text: str, key: str) -> str | None:
    """The value of ``key`` in an infotext line (None where absent)."""
    for part in text.split("\n")[-1].split(", "):
        if part.startswith(key + ": "):
            return part[len(key) + 2 :]
    return None


def test_seg_sag_nag_alone_together_and_bad_input():
    """SEG, SAG and NAG through the API: off and their neutral values are pixel-identical to no extension; each alone
    and all three with PAG change the image and write their infotext, which pastes back through the WebUI's own
    parser; CFG 1 (SAG on the cond rows, NAG's negative prompt without CFG), a batch of 2 and hires fix; bad values
    are HTTP errors naming the field, and the WebUI keeps serving."""
    plain = pixels(ok(txt2img())["images"][0])
    off = [{"seg": {"enabled": False}, "sag": {"enabled": False}, "nag": {"enabled": False}},
           {"seg": {"scale": 0}, "sag": {"scale": 0}, "nag": {"scale": 1}}]
    for args in off:
        body = ok(txt2img([args]))
        assert np.array_equal(pixels(body["images"][0]), plain), args
        assert not any(k in infotext(body) for k in ("SEG", "SAG", "NAG")), infotext(body)
    alone = {"seg": ({"scale": 3.0, "blur_sigma": 2.0}, "SEG scale: 3"),
             "sag": ({"scale": 1.0, "threshold": 0.5}, "SAG scale: 1"),
             "nag": ({"scale": 4.0, "tau": 2.0}, "NAG scale: 4")}
    for name, (values, fragment) in alone.items():
        body = ok(txt2img([{name: values}]))
        assert fragment in infotext(body), infotext(body)
        assert not np.array_equal(pixels(body["images"][0]), plain), name
    values = {"pag_enabled": True, "pag_scale": 2.0, "seg_enabled": True, "seg_scale": 2.5, "seg_blur_sigma": 3.0,
              "seg_layers": "middle, output.3", "sag_enabled": True, "sag_scale": 0.5, "sag_blur_sigma": 2.0,
              "sag_threshold": 0.8, "sag_end": 0.9, "nag_enabled": True, "nag_scale": 3.0, "nag_tau": 2.0,
              "nag_alpha": 0.5, "nag_start": 0.1, "seg_hires": "own", "seg_hires_scale": 1.5, "nag_hires": "off"}
    for cfg in (5.0, 1.0):
        base = ok(txt2img(batch_size=2, cfg_scale=cfg))
        body = ok(txt2img([values], batch_size=2, cfg_scale=cfg))
        assert len(body["images"]) == 2
        for a, b in zip(base["images"], body["images"], strict=True):
            assert not np.array_equal(pixels(a), pixels(b)), cfg
        parsed = ok(call("/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][1]}))["parameters"]
        restored = S.defaults().with_values(S.from_infotext({k: str(v) for k, v in parsed.items()}))
        assert restored == S.defaults().with_values(values), cfg
    hr = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5, hr_second_pass_steps=2,
              hr_additional_modules=["Use same choices"])  # Forge's API fails without it; A1111 ignores it
    plain_hr = pixels(ok(txt2img(**hr))["images"][0])
    guided_hr = ok(txt2img([values], **hr))
    assert pixels(guided_hr["images"][0]).shape == plain_hr.shape
    assert not np.array_equal(pixels(guided_hr["images"][0]), plain_hr)
    assert "SEG hires: own" in infotext(guided_hr) and "NAG hires: off" in infotext(guided_hr)
    for args, fragment in [({"nag": {"scale": 0.5}}, "(nag.scale)"), ({"seg": {"blur_sigma": -1}}, "(seg.blur_sigma)"),
                           ({"sag": {"threshold": "x"}}, "(sag.threshold)"), ({"seg": {"layers": "output.99"}},
                                                                               "(seg.layers)")]:
        status, err = txt2img([args])
        assert status >= 400 and fragment in json.dumps(err), (args, err)
    assert np.array_equal(pixels(ok(txt2img())["images"][0]), plain)


def test_xyz_axes_of_seg_sag_nag():
    """``[Attention] SEG scale`` (X), ``SAG scale`` (Y) and ``NAG scale`` (Z) axes: each cell equals the same settings
    run alone through ``alwayson_scripts``."""
    args = xyz_args([("[Attention] SEG scale", "0, 3"), ("[Attention] SAG scale", "0.5"), ("[Attention] NAG scale", "2")])
    body = ok(call("/sdapi/v1/txt2img", {**BASE, "script_name": "x/y/z plot", "script_args": args}))
    texts = json.loads(body["info"])["infotexts"]
    cells = [(pixels(b), t) for b, t in zip(body["images"][1:], texts[1:], strict=True)]  # [grid, cells]
    assert len(cells) == 2, texts
    for image, text in cells:
        assert _scale_of(text, "SAG scale") == "0.5" and _scale_of(text, "NAG scale") == "2", text
        seg = _scale_of(text, "SEG scale")
        single = {"sag": {"scale": 0.5}, "nag": {"scale": 2.0}, **({"seg": {"scale": 3.0}} if seg == "3" else {})}
        assert seg in ("3", "0"), text
        assert np.array_equal(image, pixels(ok(txt2img([single]))["images"][0])), text


CFG_STAGE = {"apg_enabled": True, "apg_eta": 0.1, "apg_norm_threshold": 5.0, "apg_momentum": -0.5,
             "cfg_zero_enabled": True, "cfg_zero_zero_steps": 1, "fdg_enabled": True, "fdg_levels": 2,
             "fdg_low_share": 0.4, "fdg_scales": "9, ", "ag_enabled": True, "ag_threshold": 0.999, "ag_earliest": 0.5}


def test_cfg_stage_methods_alone_together_and_bad_input():
    """APG, CFG-Zero*, FDG and AG through the API: off is pixel-identical to no extension, and so is each at CFG 1
    (nothing to combine); each alone and all together (with PAG, SAG and NAG) change the image and write infotext that
    pastes back through the WebUI's parser; batch of 2, hires fix and img2img; bad values are HTTP errors naming the
    field, and the WebUI keeps serving."""
    plain = pixels(ok(txt2img())["images"][0])
    off = {"apg": {"enabled": False}, "cfg_zero": {"enabled": False}, "fdg": {"enabled": False}, "ag": {"enabled": False}}
    assert np.array_equal(pixels(ok(txt2img([off]))["images"][0]), plain)
    plain_one = pixels(ok(txt2img(cfg_scale=1))["images"][0])
    one = ok(txt2img([{k: {"enabled": True} for k in off}], cfg_scale=1))
    assert np.array_equal(pixels(one["images"][0]), plain_one)
    alone = {"apg": ({"momentum": -0.5, "norm_threshold": 2.0}, "APG norm threshold: 2"),
             "cfg_zero": ({"zero_steps": 1}, "CFG-Zero zero steps: 1"),
             "fdg": ({"low_share": 0.3}, "FDG low share: 0.3")}
    for name, (values, fragment) in alone.items():
        body = ok(txt2img([{name: values}]))
        assert fragment in infotext(body), infotext(body)
        assert not np.array_equal(pixels(body["images"][0]), plain), name
    together = {**CFG_STAGE, "pag_enabled": True, "pag_scale": 1.5, "sag_enabled": True, "nag_enabled": True}
    base = ok(txt2img(batch_size=2))
    body = ok(txt2img([together], batch_size=2))
    for a, b in zip(base["images"], body["images"], strict=True):
        assert not np.array_equal(pixels(a), pixels(b))
    parsed = ok(call("/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][1]}))["parameters"]
    restored = S.defaults().with_values(S.from_infotext({k: str(v) for k, v in parsed.items()}))
    assert restored == S.defaults().with_values(together)
    hr = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5, hr_second_pass_steps=2,
              hr_additional_modules=["Use same choices"], hr_cfg=5.0)
    guided_hr = ok(txt2img([CFG_STAGE], **hr))
    assert not np.array_equal(pixels(guided_hr["images"][0]), pixels(ok(txt2img(**hr))["images"][0]))
    i2i = {**BASE, "init_images": [base["images"][0]], "denoising_strength": 0.6}
    a = ok(call("/sdapi/v1/img2img", i2i))
    b = ok(call("/sdapi/v1/img2img", {**i2i, "alwayson_scripts": {TITLE: {"args": [CFG_STAGE]}}}))
    assert not np.array_equal(pixels(a["images"][0]), pixels(b["images"][0]))
    for args, fragment in [({"fdg": {"scales": "9, x"}}, "(fdg.scales)"), ({"apg": {"momentum": 3}}, "(apg.momentum)"),
                           ({"ag": {"compare": "both"}}, "(ag.compare)"),
                           ({"fdg": {"enabled": True, "levels": 5}}, "(fdg.levels)")]:  # 5 bands need 384 px
        status, err = txt2img([args])
        assert status >= 400 and fragment in json.dumps(err), (args, err)
    assert np.array_equal(pixels(ok(txt2img())["images"][0]), plain)


def test_xyz_axes_of_cfg_stage_methods():
    """``[Attention] APG momentum`` (X) and ``FDG low share`` (Y): each cell equals the same settings run alone."""
    args = xyz_args([("[Attention] APG momentum", "-0.5, 0"), ("[Attention] FDG low share", "0.3")])
    body = ok(call("/sdapi/v1/txt2img", {**BASE, "script_name": "x/y/z plot", "script_args": args}))
    texts = json.loads(body["info"])["infotexts"]
    cells = [(pixels(b), t) for b, t in zip(body["images"][1:], texts[1:], strict=True)]
    assert len(cells) == 2, texts
    for image, text in cells:
        momentum = _scale_of(text, "APG momentum")
        assert momentum in ("-0.5", "0") and _scale_of(text, "FDG low share") == "0.3", text
        single = {"apg": {"enabled": True, "momentum": float(momentum)}, "fdg": {"enabled": True, "low_share": 0.3}}
        assert np.array_equal(image, pixels(ok(txt2img([single]))["images"][0])), text


def test_tpg_swg_alone_together_and_bad_input():
    """TPG and SWG through the API: off is pixel-identical; each alone and both with PAG change the image and write
    infotext that pastes back; CFG 1 (TPG), batch of 2, hires fix, img2img; bad values are HTTP errors naming the
    field."""
    plain = pixels(ok(txt2img())["images"][0])
    assert np.array_equal(pixels(ok(txt2img([{"tpg": {"scale": 0}, "swg": {"scale": 0}}]))["images"][0]), plain)
    for name, values, fragment in (("tpg", {"scale": 2.0, "layers": "input.7, input.8"}, "TPG scale: 2"),
                                   ("swg", {"scale": 4.0, "window": 0}, "SWG scale: 4")):
        body = ok(txt2img([{name: values}]))
        assert fragment in infotext(body), infotext(body)
        assert not np.array_equal(pixels(body["images"][0]), plain), name
    values = {"tpg_enabled": True, "tpg_scale": 2.0, "tpg_hires": "own", "tpg_hires_scale": 1.0, "swg_enabled": True,
              "swg_scale": 3.0, "swg_overlap": 64, "swg_end": 0.8, "pag_enabled": True, "pag_scale": 1.0}
    for cfg in (5.0, 1.0):
        base = ok(txt2img(batch_size=2, cfg_scale=cfg))
        body = ok(txt2img([values], batch_size=2, cfg_scale=cfg))
        for a, b in zip(base["images"], body["images"], strict=True):
            assert not np.array_equal(pixels(a), pixels(b)), cfg
        parsed = ok(call("/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][1]}))["parameters"]
        restored = S.defaults().with_values(S.from_infotext({k: str(v) for k, v in parsed.items()}))
        assert restored == S.defaults().with_values(values), cfg
    hr = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5, hr_second_pass_steps=2,
              hr_additional_modules=["Use same choices"])
    guided_hr = ok(txt2img([values], **hr))
    assert not np.array_equal(pixels(guided_hr["images"][0]), pixels(ok(txt2img(**hr))["images"][0]))
    assert "TPG hires: own" in infotext(guided_hr)
    i2i = {**BASE, "init_images": [base["images"][0]], "denoising_strength": 0.6}
    a = ok(call("/sdapi/v1/img2img", i2i))
    b = ok(call("/sdapi/v1/img2img", {**i2i, "alwayson_scripts": {TITLE: {"args": [values]}}}))
    assert not np.array_equal(pixels(a["images"][0]), pixels(b["images"][0]))
    for args, fragment in [({"tpg": {"layers": "input.99"}}, "(tpg.layers)"), ({"swg": {"window": 4096}}, "(swg.window)"),
                           ({"swg": {"window": 32}}, "(swg.window)"), ({"tpg": {"scale": -1}}, "(tpg.scale)")]:
        status, err = txt2img([args])
        assert status >= 400 and fragment in json.dumps(err), (args, err)
    assert np.array_equal(pixels(ok(txt2img())["images"][0]), plain)
