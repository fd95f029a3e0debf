"""The bad-input table (README, "Bad input"): every entry goes through the A1111 double's HTTP API handling
(``alwayson_scripts``), must fail the request with a message naming the field, leave nothing installed, and the
WebUI keeps serving.  Unusual but valid images (RGBA, 16-bit, CMYK, palette, ...) are accepted and converted."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from lib_attn import settings as S
from tests.fakes.a1111_double import a1111_host
from tests.support.helpers import SCRIPT, assert_no_leftovers

BASE = {"prompt": "a cube", "negative_prompt": "", "seed": 1, "steps": 2, "cfg_scale": 4.0, "width": 96,
        "height": 80}


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
GOOD = b64(png(RGB))


def colorize(ref, **kw):
    return ("img2img", [{"colorize": {"reference": ref, **kw}}])


def pag(**kw):
    return ("txt2img", [{"pag": kw}])


def section(name, **kw):
    return ("txt2img", [{name: kw}])


def style(ref, **kw):
    return ("txt2img", [{"style": {"reference": ref, **kw}}])


# (id, (tab, args), fragment of the message that must name the field)
TABLE = [
    ("scale-text", pag(scale="strong"), "PAG scale (pag.scale): expected a number"),
    ("scale-nan", pag(scale=float("nan")), "PAG scale (pag.scale): expected a finite number"),
    ("scale-inf", pag(scale=float("inf")), "PAG scale (pag.scale): expected a finite number"),
    ("scale-negative", pag(scale=-1), "PAG scale (pag.scale): -1 is out of range"),
    ("scale-too-big", pag(scale=31), "PAG scale (pag.scale): 31 is out of range"),
    ("scale-bool", pag(scale=True), "PAG scale (pag.scale): expected a number"),
    ("scale-list", pag(scale=[3]), "PAG scale (pag.scale): expected a number"),
    ("scale-null", pag(scale=None), "PAG scale (pag.scale): expected a number"),
    ("adaptive-range", pag(adaptive_scale=2), "(pag.adaptive_scale): 2 is out of range"),
    ("end-before-start", pag(start=0.9, end=0.2), "(pag.end): end (0.2) must not be below start (0.9)"),
    ("layers-number", pag(layers=5), "Layers (pag.layers): expected text"),
    ("layers-unknown-block", pag(layers="output.99"), "Layers (pag.layers): 'output.99' matched no layer"),
    ("layers-garbage", pag(layers="sideways"), "Layers (pag.layers):"),
    ("hires-choice", pag(hires="sometimes"), "Hires pass (pag.hires): expected one of same, own, off"),
    ("enabled-word", pag(enabled="maybe"), "Enable PAG (pag.enabled): expected true or false"),
    ("unknown-name", ("txt2img", [{"pag": {"sclae": 2}}]), "unknown parameter; did you mean pag_scale"),
    ("unknown-section", ("txt2img", [{"pga": {"scale": 2}}]), "(pga): unknown parameter"),
    ("section-not-object", ("txt2img", [{"pag": 3}]), "(pag): expected an object of pag parameters"),
    ("seg-sigma-negative", section("seg", blur_sigma=-1), "(seg.blur_sigma): -1 is out of range [0, inf]"),
    ("seg-layers", section("seg", layers="input.99"), "Layers (seg.layers): 'input.99' matched no layer"),
    ("seg-hires-scale", section("seg", hires="own", hires_scale=40), "(seg.hires_scale): 40 is out of range"),
    ("seg-hires-choice", section("seg", hires="twice"), "Hires pass (seg.hires): expected one of same, own, off"),
    ("sag-scale", section("sag", scale=6), "SAG scale (sag.scale): 6 is out of range [0, 5]"),
    ("sag-sigma", section("sag", blur_sigma="wide"), "Blur sigma (sag.blur_sigma): expected a number"),
    ("sag-threshold", section("sag", threshold=-0.5), "Mask threshold (sag.threshold): -0.5 is out of range"),
    ("sag-end", section("sag", start=0.5, end=0.1), "(sag.end): end (0.1) must not be below start (0.5)"),
    ("sag-hires", section("sag", hires="no"), "Hires pass (sag.hires): expected one of same, own, off"),
    ("sag-hires-scale", section("sag", hires="own", hires_scale=9), "(sag.hires_scale): 9 is out of range"),
    ("nag-scale-below-one", section("nag", scale=0.5), "NAG scale (nag.scale): 0.5 is out of range [1, 20]"),
    ("nag-tau", section("nag", tau=0), "Tau (norm limit) (nag.tau): 0 is out of range [1, 10]"),
    ("nag-alpha", section("nag", alpha=1.5), "Alpha (blend) (nag.alpha): 1.5 is out of range [0, 1]"),
    ("nag-end", section("nag", start=0.7, end=0.3), "(nag.end): end (0.3) must not be below start (0.7)"),
    ("nag-hires", section("nag", hires=1), "Hires pass (nag.hires): expected one of same, own, off"),
    ("nag-hires-scale", section("nag", hires="own", hires_scale=0), "(nag.hires_scale): 0 is out of range [1, 20]"),
    ("apg-threshold", section("apg", norm_threshold=-1), "Norm threshold (apg.norm_threshold): -1 is out of range"),
    ("apg-momentum", section("apg", momentum="fast"), "Momentum (apg.momentum): expected a number"),
    ("cfg-zero-steps", section("cfg_zero", zero_steps=1.5), "(cfg_zero.zero_steps): expected a whole number"),
    ("cfg-zero-fraction", section("cfg_zero", zero_fraction=0.9), "(cfg_zero.zero_fraction): 0.9 is out of range"),
    ("fdg-levels", section("fdg", levels=9), "Bands (fdg.levels): 9 is out of range [2, 5]"),
    ("fdg-scales", section("fdg", scales="9, x"), "Band scales (fdg.scales): could not convert string to float"),
    ("fdg-scales-count", section("fdg", scales="9, 5, 1"), "Band scales (fdg.scales): 3 scales for 2 bands"),
    ("fdg-scale-range", section("fdg", scales="50"), "(fdg.scales): band scale 50 is out of range [0, 30]"),
    ("ag-threshold", section("ag", threshold=0.5), "Similarity threshold (ag.threshold): 0.5 is out of range"),
    ("ag-compare", section("ag", compare="both"), "Compare (ag.compare): expected one of denoised, noise"),
    ("tpg-scale", section("tpg", scale=21), "TPG scale (tpg.scale): 21 is out of range [0, 20]"),
    ("tpg-layers", section("tpg", layers="input.99"), "Blocks (tpg.layers): 'input.99' matched no layer"),
    ("swg-window-small", section("swg", window=32), "Window (pixels) (swg.window): 32 is below the smallest window"),
    ("swg-window-large", section("swg", window=1024), "Window (pixels) (swg.window): a window of 1024 pixels is larger"),
    ("swg-overlap", section("swg", overlap=-8), "Least overlap (pixels) (swg.overlap): -8 is out of range"),
    ("swg-hires", section("swg", hires="half"), "Hires pass (swg.hires): expected one of same, own, off"),
    ("tpg-hires", section("tpg", hires=2), "Hires pass (tpg.hires): expected one of same, own, off"),
    ("start-comma-decimal", pag(start="0,5"), "Start (fraction of steps) (pag.start): expected a number"),
    ("colorize-guidance", colorize(GOOD, guidance=0), "(colorize.guidance): 0 is out of range"),
    ("colorize-strength", colorize(GOOD, strength=1.5), "(colorize.strength): 1.5 is out of range"),
    ("colorize-layers", colorize(GOOD, layers="input.99"), "(colorize.layers): 'input.99' matched no layer"),
    ("colorize-paper", colorize(GOOD, paper="sometimes"), "(colorize.paper)"),
    ("colorize-passes", colorize(GOOD, paper=True, passes=9), "(colorize.passes): 9 is out of range"),
    ("colorize-in-txt2img", ("txt2img", [{"colorize": {"reference": GOOD}}]), "(colorize.enabled): reference "
                                                                               "colorization works in img2img"),
    ("reference-missing", ("img2img", [{"colorize": {}}]), "(colorize.reference): reference colorization is on "
                                                           "but no colour reference was given"),
    ("reference-bad-base64", colorize("%%%not base64"), "(colorize.reference): not valid base64 image data"),
    ("reference-not-an-image", colorize(b64(b"hello, world" * 10)), "(colorize.reference): the data is not an "
                                                                     "image"),
    ("reference-truncated-png", colorize(b64(png(RGB)[:300])), "(colorize.reference): the image data is broken or "
                                                                "truncated"),
    ("reference-bomb", colorize(b64(png(Image.new("1", (12000, 12000))))), "(colorize.reference): the image is "
                                                                             "12000x12000, more than the 64 "
                                                                             "megapixel limit"),
    ("reference-url", colorize("https://example.com/a.png"), "(colorize.reference): URLs and file paths are not "
                                                             "accepted"),
    ("reference-path", colorize("/etc/passwd"), "(colorize.reference): URLs and file paths are not accepted"),
    ("reference-tiny", colorize(b64(png(Image.new("RGB", (4, 4))))), "(colorize.reference): the image is 4x4; it "
                                                                      "must be at least 8x8"),
    ("reference-number", colorize(42), "(colorize.reference): expected an image"),
    ("reference-list-item", colorize([GOOD, "%%%"]), "(colorize.reference): image 1: not valid base64"),
    ("reference-count", ("img2img", [{"colorize": {"reference": [GOOD, GOOD, GOOD]}}]),
     "(colorize.reference): give one reference for all images or one per image of the batch (1), got 3"),
    ("style-reference-missing", ("txt2img", [{"style": {}}]),
     "Style image (style.reference): style reference is on but no style image was given"),
    ("style-reference-bad-base64", style("data:image/png;base64,%%%"), "(style.reference): not valid base64"),
    ("style-reference-count", ("txt2img", [{"style": {"reference": [GOOD, GOOD, GOOD], "pairing": "each"}}]),
     "(style.reference): with 'Several style images' each, give one style image for all images or one per image of "
     "the batch (1), got 3"),
    ("style-adain-mode", style(GOOD, adain_mode="clean"), "AdaIN on (style.adain_mode): expected one of noisy, denoised"),
    ("style-pairing", style(GOOD, pairing=2), "Several style images (style.pairing): expected one of all, each"),
    ("style-mode", style(GOOD, mode="optimize"), "Mode (style.mode): expected one of guidance, transfer"),
    ("style-transfer-lr", style(GOOD, transfer_lr=0.9), "Transfer learning rate (style.transfer_lr)"),
    ("style-iters-zero", style(GOOD, iters=0), "(style.iters): 0 is out of range"),
    ("style-iters-fraction", style(GOOD, iters=2.5), "(style.iters): expected a whole number"),
    ("style-strength-nan", style(GOOD, strength="nan"), "Strength (style.strength): expected a finite number"),
    ("style-layers", style(GOOD, layers="middle.7"), "(style.layers): 'middle.7' matched no layer"),
    ("style-checkpointing", style(GOOD, checkpointing="sometimes"),
     "(style.checkpointing): expected one of auto, on, off"),
    ("style-hires-choice", style(GOOD, hires="sometimes"), "Hires pass (style.hires): expected one of same, own, off"),
    ("style-content-weight", style(GOOD, content_weight=-0.5), "(style.content_weight): -0.5 is out of range"),
    ("edit-mask-in-txt2img", ("txt2img", [{"edit_mask": {}}]),
     "(edit_mask.enabled): the automatic edit mask works in img2img"),
    ("edit-mask-unknown-word", ("img2img", [{"edit_mask": {"words": "dog"}}]),
     "Mask words (edit_mask.words): dog not in the prompt's first 75 tokens"),
    ("edit-mask-threshold", ("img2img", [{"edit_mask": {"threshold": 1.5}}]),
     "(edit_mask.threshold): 1.5 is out of range"),
    ("edit-mask-grow-fraction", ("img2img", [{"edit_mask": {"grow": 2.5}}]), "(edit_mask.grow): expected a whole"),
    ("edit-mask-inpaint-model", ("img2img", [{"edit_mask": {"final": "inpaint", "inpaint_model": "nope.ckpt"}}]),
     "(edit_mask.inpaint_model): no checkpoint named 'nope.ckpt'"),
    ("edit-mask-similarities", ("img2img", [{"edit_mask": {"other_similarity": 0.95}}]),
     "(edit_mask.other_similarity): 0.95 must not be above the object word similarity (0.9)"),
    ("edit-mask-final", ("img2img", [{"edit_mask": {"final": "sometimes"}}]),
     "Final pass (edit_mask.final): expected one of blend, inpaint"),
    ("edit-mask-layers", ("img2img", [{"edit_mask": {"layers": "middle.3"}}]),
     "(edit_mask.layers): 'middle.3' matched no layer"),
    ("yoda-txt2img-without-hires", ("txt2img", [{"yoda": {"source": "unet"}}]),
     "(yoda.enabled): in txt2img masked upscaling acts on the hires-fix pass"),
    ("yoda-dino-missing-offline", ("img2img", [{"yoda": {"source": "dino-vits8"}}]),
     "Attention source (yoda.source): could not load facebook/dino-vits8"),
    ("yoda-source", ("img2img", [{"yoda": {"source": "clip"}}]),
     "Attention source (yoda.source): expected one of dino-vits8, dino-vitb8, unet"),
    ("yoda-start-coverage", ("img2img", [{"yoda": {"start_coverage": 1.5}}]), "(yoda.start_coverage): 1.5 is out of range"),
    ("yoda-growth-zero", ("img2img", [{"yoda": {"growth": 0}}]), "(yoda.growth): 0 is out of range"),
    ("yoda-blur-fraction", ("img2img", [{"yoda": {"blur": 2.5}}]), "(yoda.blur): expected a whole"),
]


@pytest.fixture(scope="module")
def host():
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        yield h


def call(h, tab, args):
    payload = {**BASE, "alwayson_scripts": {"Attention Toolkit": {"args": args}}}
    if tab == "img2img":
        payload.update(init_images=[GOOD], denoising_strength=0.5)
        return h.api_img2img(payload)
    return h.api_txt2img(payload)


def _fields_named(fragment: str) -> set[str]:
    return set(re.findall(r"\(([a-z_]+\.[a-z_]+)\)", fragment))


def test_the_table_covers_every_section_and_every_checked_field():
    """The table tracks the settings: each method section has an entry, and so does every field whose values are
    checked beyond a number's type and range (choices, images, layer names), so a new section or choice field
    needs its bad-input entry.  A field named in a fragment exists, and ids are unique (pytest would otherwise
    rename a duplicate silently and both rows would run under near-identical names)."""
    named = set().union(*(_fields_named(t[2]) for t in TABLE))
    assert named <= set(S.FIELD_BY_API), sorted(named - set(S.FIELD_BY_API))
    sections = {n.split(".")[0] for n in named}
    assert sections >= set(S.SECTIONS), f"no bad-input entry for section(s) {sorted(set(S.SECTIONS) - sections)}"
    checked = {f.api_name for f in S.FIELDS if f.kind in ("choice", "image") or f.name == "layers"}
    assert checked <= named, f"no bad-input entry for {sorted(checked - named)}"
    assert len({t[0] for t in TABLE}) == len(TABLE)


@pytest.mark.parametrize(("name", "request_", "fragment"), TABLE, ids=[t[0] for t in TABLE])
def test_bad_input_fails_with_the_field_named(host, name, request_, fragment):
    tab, args = request_
    status, resp = call(host, tab, args)
    assert status == 500, resp
    assert fragment in resp["errors"], resp["errors"]
    assert resp["errors"].startswith("Attention Toolkit: ")
    assert host.callback_count() == 0
    assert_no_leftovers(host)
    status, _ = call(host, "txt2img", [{"pag": {"scale": 2}}])  # the WebUI keeps serving
    assert status == 200


def _modes():
    rgba = RGB.convert("RGBA")
    rgba.putalpha(128)
    i16 = Image.fromarray((np.asarray(RGB.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    return {
        "rgba": b64(png(rgba)),
        "16-bit": b64(png(i16)),
        "cmyk-jpeg": b64(png(RGB.convert("CMYK"), "JPEG")),
        "palette": b64(png(RGB.convert("P", palette=Image.Palette.ADAPTIVE))),
        "gray": b64(png(RGB.convert("L"))),
        "la": b64(png(RGB.convert("LA"))),
        "data-url-jpeg": "data:image/jpeg;base64," + b64(png(RGB, "JPEG")),
        "webp": b64(png(RGB, "WEBP")),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_unusual_but_valid_images_are_accepted(host, mode):
    status, resp = call(host, "img2img", [{"colorize": {"reference": _modes()[mode]}}])
    assert status == 200, resp
    assert_no_leftovers(host)
