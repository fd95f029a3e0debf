"""Every parameter through the API (named and positional), infotext paste-back and XYZ axes (A1111 double)."""

from __future__ import annotations

import copy
import json
from collections import namedtuple

import pytest

from lib_attn import settings as S
from tests.fakes.a1111_double import a1111_host
from tests.support.helpers import SCRIPT

BASE = {"prompt": "a red cube", "negative_prompt": "", "seed": 2, "steps": 2, "cfg_scale": 4.0, "width": 96,
        "height": 80}
CUSTOM = {"pag_enabled": True, "pag_scale": 2.5, "pag_adaptive_scale": 0.001, "pag_start": 0.1, "pag_end": 0.9,
          "pag_layers": "middle, output.4", "pag_hires": "own", "pag_hires_scale": 1.25}


@pytest.fixture(scope="module")
def host():
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        yield h


def infotext_of(resp):
    return json.loads(resp["info"])["infotexts"][0]


def test_api_named_positional_and_flat_forms_agree(host):
    expected = S.defaults().with_values(CUSTOM).to_infotext()
    named = {"pag": {k[4:]: v for k, v in CUSTOM.items() if k != "pag_enabled"}}
    forms = [[named], S.defaults().with_values(CUSTOM).to_args(), [dict(CUSTOM)]]
    for args in forms:
        status, resp = host.api_txt2img({**BASE, "alwayson_scripts": {"attention toolkit": {"args": args}}})
        assert status == 200, resp
        text = infotext_of(resp)
        for key, value in expected.items():
            assert f"{key}: {value}" in text or f'{key}: "{value}"' in text


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([{"pag": {"scale": "strong"}}], "PAG scale (pag.scale): expected a number"),
        ([{"pag": {"layers": "output.2"}}], "Layers (pag.layers): 'output.2' matched no layer"),
        ([{"pag": {"hires": "sometimes"}}], "Hires pass (pag.hires): expected one of same, own, off"),
        ([{"pag": {"sclae": 2}}], "did you mean pag_scale"),
        ([True, 3.0, 0.0, 0.8, 0.2], "End (fraction of steps) (pag.end)"),
    ],
)
def test_api_bad_input_is_an_error_naming_the_field(host, args, fragment):
    status, resp = host.api_txt2img({**BASE, "alwayson_scripts": {"Attention Toolkit": {"args": args}}})
    assert status == 500
    assert fragment in resp["errors"]
    assert host.callback_count() == 0
    status, _ = host.api_txt2img(BASE)  # the WebUI keeps serving
    assert status == 200


def test_unknown_script_title_is_422(host):
    status, _ = host.api_txt2img({**BASE, "alwayson_scripts": {"Attention Tool": {"args": [{}]}}})
    assert status == 422


def test_infotext_pastes_back_every_field(host):
    out = host.txt2img(**BASE, script_args=S.defaults().with_values(CUSTOM).to_args())
    script = host.script(is_img2img=False)
    paste = host.modules.infotext_utils.pasted_values  # the WebUI's paste
    pasted = dict(zip((c.elem_id for c, _ in script.infotext_fields), paste(out.infotexts[0], script.infotext_fields), strict=True))
    # controls without an infotext entry (an uploaded image) keep what they hold; here, their default
    keep = {c.elem_id: f.default for c, f in zip(script.controls, S.FIELDS, strict=True)}
    values = [pasted.get(c.elem_id, keep[c.elem_id]) for c in script.controls]
    assert S.from_args(values) == S.defaults().with_values(CUSTOM)
    # an infotext without our keys resets every control to its default (PAG off)
    empty = dict(zip((c.elem_id for c, _ in script.infotext_fields), paste("a cat\nSteps: 20, Seed: 1, Size: 64x64",
                                                                          script.infotext_fields), strict=True))
    assert S.from_args([empty.get(c.elem_id, keep[c.elem_id]) for c in script.controls]) == S.defaults()


IMAGE_SECTIONS = {
    "colorize": (True, {"colorize_strength": 0.8, "colorize_guidance": 4.0, "colorize_start": 0.1,
                        "colorize_end": 0.9, "colorize_layers": "output.3, output.11", "colorize_gamma_fine": 0.3,
                        "colorize_beta_fine": 0.2, "colorize_gamma_coarse": 0.9, "colorize_beta_coarse": 0.1,
                        "colorize_adain": False, "colorize_match_colors": False}),
    "style": (False, {"style_strength": 0.03, "style_iters": 1, "style_start": 0.2, "style_end": 0.8,
                      "style_layers": "output.9, output.10", "style_content_weight": 0.5, "style_adain": False,
                      "style_temperature": 1.2, "style_checkpointing": "on", "style_hires": "own",
                      "style_hires_strength": 0.02}),
}


@pytest.mark.parametrize("section", list(IMAGE_SECTIONS))
def test_sections_with_an_image_paste_back(host, section):
    """Every value but the image comes back from the infotext; the image control keeps its upload (infotext only
    records a digest of it)."""
    from PIL import Image

    is_img2img, custom = IMAGE_SECTIONS[section]
    ref = Image.new("RGB", (32, 32), (200, 40, 10))
    settings = S.defaults().with_values({**custom, f"{section}_enabled": True, f"{section}_reference": ref})
    kw = dict(BASE, init_images=[Image.new("RGB", (96, 80), (120, 120, 120))]) if is_img2img else BASE
    run = host.img2img if is_img2img else host.txt2img
    out = run(**kw, script_args=settings.to_args())
    params = host.modules.infotext_utils.parse_generation_parameters(out.infotexts[0])
    assert params[S.FIELD_BY_KEY[f"{section}_reference"].infotext] == S.image_digest((ref,))
    script = host.script(is_img2img=is_img2img)
    values = host.modules.infotext_utils.pasted_values(out.infotexts[0], script.infotext_fields)
    pasted = dict(zip((c.elem_id for c, _ in script.infotext_fields), values, strict=True))
    keep = {c.elem_id: (ref if f.key == f"{section}_reference" else f.default)
            for c, f in zip(script.controls, S.FIELDS, strict=True)}
    values = [pasted.get(c.elem_id, keep[c.elem_id]) for c in script.controls]
    assert S.from_args(values) == settings


def test_xyz_axes_cover_every_field_and_switch_the_method_on(host):
    from lib_attn.host import xyz

    AxisOption = namedtuple("AxisOption", ["label", "type", "apply", "choices"], defaults=[None])
    fake = type("Xyz", (), {"AxisOption": AxisOption, "axis_options": []})
    axes = xyz.axis_options(fake)
    assert [a.label for a in axes] == [S.XYZ_PREFIX + f.infotext for f in S.FIELDS if f.kind != "image"]
    assert axes[[a.label for a in axes].index("[Attention] PAG hires")].choices() == ["same", "own", "off"]

    p = host.modules.processing.StableDiffusionProcessingTxt2Img(**BASE)
    cells = []
    for value in (1.5, 4.0):
        cell = copy.copy(p)  # the XYZ script works on a shallow copy per cell
        axes[1].apply(cell, value, [])
        cells.append(cell)
    assert cells[0].attn_toolkit_overrides == {"pag_scale": 1.5}
    assert cells[1].attn_toolkit_overrides == {"pag_scale": 4.0}
    assert not hasattr(p, "attn_toolkit_overrides")
    out = host.txt2img(**BASE, attn_toolkit_overrides={"pag_scale": 1.5})  # UI args leave PAG off
    assert "PAG scale: 1.5" in out.infotexts[0]
    with pytest.raises(S.SettingsError):
        axes[1].apply(copy.copy(p), "huge", [])
