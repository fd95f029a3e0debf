"""SAG on both doubles: off is bit-identical, the Forge path equals the A1111 path (which equals diffusers,
``test_sag_diffusers.py``), with and without CFG, in the hires pass and with every sampler kind."""

from __future__ import annotations

import pytest
import torch

from lib_attn import settings as S
from tests.fakes.a1111_double import a1111_host
from tests.fakes.forge_env import forge_host
from tests.support.helpers import SCRIPT, assert_no_leftovers

BASE = dict(prompt="a red cube", negative_prompt="blurry", seed=5, steps=3, cfg_scale=5.0, width=128, height=128)


def sag_args(**kw):
    values = {"sag_enabled": True}
    for k, v in kw.items():
        values[k if k.startswith(("pag_", "seg_", "sag_")) else f"sag_{k}"] = v
    return S.defaults().with_values(values).to_args()


@pytest.mark.parametrize("make", [a1111_host, forge_host])
def test_off_and_scale_zero_are_bit_identical(make):
    with make("sd1") as h:
        plain = h.txt2img(**BASE, batch_size=2).samples
    with make("sd1") as h:
        h.load_script(SCRIPT)
        off = h.txt2img(**BASE, batch_size=2, script_args=S.defaults().to_args()).samples
        zero = h.txt2img(**BASE, batch_size=2, script_args=sag_args(scale=0.0)).samples
        assert h.callback_count() == 0
    assert torch.equal(plain, off)
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_forge_matches_a1111_path(cfg):
    """Forge skips the uncond rows at CFG 1 (SAG then works from the cond rows); A1111 computes them but SAG takes
    the cond rows too, as diffusers does without CFG."""
    kw = dict(BASE, batch_size=2, sampler_name="Euler", cfg_scale=cfg)
    results = {}
    for name, make in (("a1111", a1111_host), ("forge", forge_host)):
        with make("sd1") as h:
            h.load_script(SCRIPT)
            on = h.txt2img(**kw, script_args=sag_args()).samples
            results[name] = (on, h.txt2img(**kw).samples)
            assert h.callback_count() == 0
    (a, a_plain), (f, f_plain) = results["a1111"], results["forge"]
    assert (a_plain - f_plain).abs().max() < 1e-4 * a_plain.abs().max()
    delta_a, delta_f = a - a_plain, f - f_plain
    assert delta_f.abs().max() > 1e-2
    assert (delta_a - delta_f).abs().max() < 1e-3 * delta_a.abs().max()


def test_forge_extra_call_per_step_uses_the_uncond_conditioning():
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        h.txt2img(**BASE, batch_size=2, sampler_name="Euler", script_args=sag_args())
        calls = [(c["rows"], c["cond_or_uncond"]) for c in h.unet_calls]
    # each step: the CFG call (cond + uncond rows), then SAG's degraded call of B rows
    assert len(calls) == 2 * BASE["steps"]
    assert all(sorted(c[1]) == [0, 1] for c in calls[::2])
    assert all(c == (2, [0]) for c in calls[1::2])  # calc_cond_uncond_batch runs the given conds as "cond"


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM", "DPM++ SDE"])
def test_every_sampler_kind(sampler):
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        kw = dict(BASE, steps=4, sampler_name=sampler)
        plain = h.txt2img(**kw).samples
        out = h.txt2img(**kw, script_args=sag_args())
        assert_no_leftovers(h)
    assert torch.isfinite(out.samples).all()
    assert (out.samples - plain).abs().max() > 1e-3
    assert "SAG scale: 0.75" in out.infotexts[0]


def test_hires_override_and_sdxl():
    kw = dict(BASE, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5)
    with a1111_host("sdxl") as h:
        h.load_script(SCRIPT)
        first_only = h.txt2img(**kw, script_args=sag_args(hires="off")).samples
        both = h.txt2img(**kw, script_args=sag_args()).samples
        own = h.txt2img(**kw, script_args=sag_args(hires="own", hires_scale=2.0))
        assert_no_leftovers(h)
    assert (both - first_only).abs().max() > 1e-4
    assert (own.samples - both).abs().max() > 1e-4
    assert "SAG hires: own" in own.infotexts[0] and "SAG hires scale: 2" in own.infotexts[0]


def test_with_pag_and_seg_on_forge_and_a1111():
    """All three guidance terms at once: each method's own rows or calls; the SAG observer ignores the others'."""
    args = sag_args(pag_enabled=True, pag_scale=1.0, seg_enabled=True, seg_scale=1.0)
    for make in (a1111_host, forge_host):
        with make("sd1") as h:
            h.load_script(SCRIPT)
            plain = h.txt2img(**BASE, batch_size=2, sampler_name="Euler").samples
            out = h.txt2img(**BASE, batch_size=2, sampler_name="Euler", script_args=args).samples
            assert h.callback_count() == 0
        assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3


def test_with_style_reference_gradient_checkpointing():
    """Style reference's first guided forward is the host's uncond call, with grad, and checkpointed blocks are
    recomputed in its backward after the call, where SAG's observer no longer looks: the observation must save
    nothing for autograd, or the recomputation saves a different set of tensors and fails.  Checkpointing on or
    off gives the same result."""
    from PIL import Image

    ref = Image.new("RGB", (64, 56), (200, 30, 40))
    outs = []
    for checkpointing in ("on", "off"):
        with a1111_host("sd1") as h:
            h.load_script(SCRIPT)
            named = {"sag": {"scale": 0.75}, "style": {"reference": ref, "strength": 0.2, "iters": 1,
                                                       "checkpointing": checkpointing}}
            outs.append(h.txt2img(**{**BASE, "width": 64, "height": 64}, sampler_name="Euler",
                                  script_args=[named]).samples)
            assert h.callback_count() == 0
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
