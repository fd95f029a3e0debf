"""Settings table <-> positional args <-> named API form <-> infotext, and error messages."""

from __future__ import annotations

import pytest

from lib_attn import settings as S

EXAMPLE = {
    "pag_enabled": True,
    "pag_scale": 4.5,
    "pag_adaptive_scale": 0.002,
    "pag_start": 0.1,
    "pag_end": 0.8,
    "pag_layers": "middle, output.1.0",
    "pag_hires": "own",
    "pag_hires_scale": 1.5,
}
from PIL import Image  # noqa: E402

REF = Image.new("RGB", (16, 16), (200, 30, 10))
EXAMPLE_ALL = {
    **EXAMPLE,
    "colorize_enabled": True,
    "colorize_reference": (REF,),
    "colorize_strength": 0.7,
    "colorize_guidance": 5.5,
    "colorize_start": 0.2,
    "colorize_end": 0.9,
    "colorize_layers": "output.9",
    "colorize_gamma_fine": 0.4,
    "colorize_beta_fine": 0.3,
    "colorize_gamma_coarse": 0.8,
    "colorize_beta_coarse": 0.1,
    "colorize_adain": False,
    "colorize_match_colors": False,
    "style_enabled": True,
    "style_reference": (REF,),
    "style_strength": 0.02,
    "style_iters": 3,
    "style_start": 0.1,
    "style_end": 0.7,
    "style_layers": "output.10",
    "style_content_weight": 0.5,
    "style_adain": False,
    "style_temperature": 1.5,
    "style_checkpointing": "on",
    "style_hires": "own",
    "style_hires_strength": 0.02,
    "style_adain_mode": "denoised",
    "style_pairing": "each",
    "style_mode": "transfer",
    "style_transfer_lr": 0.1,
    "colorize_paper": True,
    "colorize_passes": 2,
    "edit_mask_inpaint_model": "sd-inpainting.safetensors",
    "seg_enabled": True,
    "seg_scale": 2.5,
    "seg_blur_sigma": 4.0,
    "seg_start": 0.1,
    "seg_end": 0.9,
    "seg_layers": "middle, output.1",
    "seg_hires": "own",
    "seg_hires_scale": 1.0,
    "sag_enabled": True,
    "sag_scale": 0.5,
    "sag_blur_sigma": 2.0,
    "sag_threshold": 0.9,
    "sag_start": 0.0,
    "sag_end": 0.8,
    "sag_hires": "off",
    "sag_hires_scale": 0.5,
    "nag_enabled": True,
    "nag_scale": 3.0,
    "nag_tau": 2.0,
    "nag_alpha": 0.5,
    "nag_start": 0.0,
    "nag_end": 0.5,
    "nag_hires": "own",
    "nag_hires_scale": 2.0,
    "edit_mask_enabled": True,
    "edit_mask_words": "cat, hat",
    "edit_mask_threshold": 0.35,
    "edit_mask_grow": 16,
    "edit_mask_blur": 0,
    "edit_mask_layers": "output.3",
    "edit_mask_object_similarity": 0.8,
    "edit_mask_other_similarity": 0.5,
    "edit_mask_batch_average": True,
    "edit_mask_show": False,
    "edit_mask_final": "inpaint",
    "edit_mask_seeds": 3,
    "yoda_enabled": True,
    "yoda_source": "unet",
    "yoda_start_coverage": 0.4,
    "yoda_growth": 2.5,
    "yoda_threshold": 0.8,
    "yoda_blur": 0,
    "yoda_show": True,
    "colorize_reference_scale": 0.75,
    "apg_enabled": True,
    "apg_eta": 0.2,
    "apg_norm_threshold": 7.5,
    "apg_momentum": -0.25,
    "apg_start": 0.1,
    "apg_end": 0.9,
    "cfg_zero_enabled": True,
    "cfg_zero_zero_steps": 2,
    "cfg_zero_zero_fraction": 0.04,
    "cfg_zero_start": 0.0,
    "cfg_zero_end": 0.7,
    "fdg_enabled": True,
    "fdg_levels": 3,
    "fdg_low_share": 0.4,
    "fdg_scales": "12, , 3",
    "fdg_start": 0.05,
    "fdg_end": 1.0,
    "ag_enabled": True,
    "ag_threshold": 0.995,
    "ag_earliest": 0.2,
    "ag_compare": "noise",
    "tpg_enabled": True,
    "tpg_scale": 2.5,
    "tpg_start": 0.0,
    "tpg_end": 0.8,
    "tpg_layers": "input.8",
    "tpg_hires": "own",
    "tpg_hires_scale": 1.5,
    "swg_enabled": True,
    "swg_scale": 4.0,
    "swg_window": 512,
    "swg_overlap": 64,
    "swg_start": 0.0,
    "swg_end": 0.6,
    "swg_hires": "off",
    "swg_hires_scale": 5.0,
}


def test_positional_order_never_moves():
    """The positional API order is append-only: every recorded entry keeps its index (tests/golden/positional.json:
    the first 53 written from the table before the methods moved into their folders, then each later field appended);
    new fields only come after them."""
    import json
    import pathlib

    recorded = json.loads((pathlib.Path(__file__).parent / "golden" / "positional.json").read_text())
    assert [f.api_name for f in S.FIELDS][: len(recorded)] == recorded
    assert len({f.api_name for f in S.FIELDS}) == len(S.FIELDS)
    assert {f.section for f in S.FIELDS} == set(S.SECTIONS)


def test_section_classes_follow_the_fields():
    from lib_attn.methods import BY_NAME

    for section in S.SECTIONS:
        cls = BY_NAME[section].settings_class
        names = [f.name for f in S.fields_of(section)]
        assert names == [f.name for f in __import__("dataclasses").fields(cls)]
        for f in S.fields_of(section):
            assert getattr(cls(), f.name) == f.default, f.key
    assert len({f.infotext for f in S.FIELDS}) == len(S.FIELDS)
    assert all(f.infotext.startswith("PAG") for f in S.fields_of("pag"))


def test_defaults_are_off():
    s = S.from_args([])
    assert s == S.defaults()
    assert not s.any_active
    assert s.to_infotext() == {}


def test_positional_round_trip():
    s = S.defaults().with_values(EXAMPLE_ALL)
    assert S.from_args(s.to_args()) == s
    assert s.values() == EXAMPLE_ALL


def test_named_form_nested_and_flat():
    nested = S.from_args([{"pag": {"scale": 4.5, "adaptive_scale": 0.002, "start": 0.1, "end": 0.8,
                                   "layers": "middle, output.1.0", "hires": "own", "hires_scale": 1.5}}])
    flat = S.from_args([{k: v for k, v in EXAMPLE.items()}])
    dotted = S.from_args([{f"pag.{k[4:]}": v for k, v in EXAMPLE.items()}])
    assert nested == flat == dotted == S.defaults().with_values(EXAMPLE)


def test_named_section_enables_unless_told():
    assert S.from_args([{"pag": {}}]).pag.enabled
    assert not S.from_args([{"pag": {"enabled": False, "scale": 2}}]).pag.enabled
    # flat names switch their method on too (found through the real WebUI's API), unless told otherwise
    assert S.from_args([{"pag_scale": 2}]).pag.enabled
    assert S.from_args([{"pag.end": 0.5}]).pag.enabled
    assert not S.from_args([{"pag_scale": 2, "pag_enabled": False}]).pag.enabled
    assert not S.from_args([{"pag.enabled": "false", "pag.scale": 2}]).pag.enabled


def test_infotext_round_trip():
    s = S.defaults().with_values(EXAMPLE_ALL)
    text = s.to_infotext()
    assert set(text) == {f.infotext for f in S.FIELDS if f.name != "enabled"}
    assert text["Colorize reference"] == S.image_digest((REF,))  # an image is recorded by its digest
    # the reference image control keeps its upload when infotext is pasted
    back = S.defaults().with_values({**S.from_infotext(text), "colorize_reference": (REF,), "style_reference": (REF,)})
    assert back == s
    for f in S.FIELDS:
        if f.kind != "image":
            assert S.infotext_value(f, text) == EXAMPLE_ALL[f.key]
        assert S.infotext_value(f, {}) == f.default


@pytest.mark.parametrize(
    ("args", "field", "fragment"),
    [
        ([True, "abc"], "pag.scale", "expected a number"),
        ([True, float("nan")], "pag.scale", "finite"),
        ([True, -1.0], "pag.scale", "out of range"),
        ([True, 31], "pag.scale", "out of range"),
        (["maybe"], "pag.enabled", "true or false"),
        ([True, 3.0, 0.0, 0.9, 0.2], "pag.end", "must not be below start"),
        ([True, 3.0, 0.0, 0.0, 1.0, 5], "pag.layers", "expected text"),
        ([True, 3.0, 0.0, 0.0, 1.0, "middle", "sometimes"], "pag.hires", "expected one of"),
        ([{"pag": {"scael": 3}}], "pag_scael", "did you mean pag_scale"),
        ([{"pag": 3}], "pag", "expected an object"),
        ([{"nonsense": 1}], "nonsense", "unknown parameter"),
        ([True, True], "pag.scale", "expected a number"),
    ],
)
def test_errors_name_the_field(args, field, fragment):
    with pytest.raises(S.SettingsError) as e:
        S.from_args(args)
    assert e.value.field == field
    assert fragment in str(e.value)
    assert str(e.value).startswith("Attention Toolkit:")


def test_hires_override():
    base = S.defaults().with_values({"pag_enabled": True, "pag_scale": 3.0, "pag_hires_scale": 1.0})
    assert base.pag.for_pass(True) == base.pag
    own = S.defaults().with_values({"pag_enabled": True, "pag_hires": "own", "pag_hires_scale": 1.0}).pag
    assert own.for_pass(True).scale == 1.0 and own.for_pass(False).scale == 3.0
    off = S.defaults().with_values({"pag_enabled": True, "pag_hires": "off"}).pag
    assert not off.for_pass(True).enabled and off.for_pass(False).enabled


def test_formatting_is_compact_and_exact():
    """Compact: no trailing ".0", no exponent, no float noise; exact: a value typed with up to ten significant
    digits reads back as the same float."""
    f = S.FIELD_BY_KEY["pag_scale"]
    compact = {0.1: "0.1", 3.0: "3", 2.75: "2.75", 1e-3: "0.001", 0.0: "0", 0.1 + 0.2: "0.3", 1 / 3: "0.3333333333"}
    assert {v: f.format(v) for v in compact} == compact
    for v in (0.1, 3.0, 2.75, 1e-3, 1.234567891, 29.99999999):
        assert f.parse(f.format(v)) == v, (v, f.format(v))


def test_docs_document_the_positional_order():
    """The positional table (docs/api.md; the README held it before the docs split) lists every field, in the
    table's order."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    tables = {}
    for doc in ("docs/api.md", "README.md"):
        text = (root / doc).read_text() if (root / doc).is_file() else ""
        tables[doc] = re.findall(r"^\| (\d+) \| `(\w+)` \|", text, flags=re.M)
    doc, rows = next(((d, r) for d, r in tables.items() if r), ("docs/api.md", []))
    assert [(int(i), k) for i, k in rows] == [(i, f.key) for i, f in enumerate(S.FIELDS)], doc
