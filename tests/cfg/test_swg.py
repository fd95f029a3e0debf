"""SWG: the window layout and the blend; end to end on the A1111 double against an independent loop (separate
uncond and cond calls, the cond model run on each crop, joined with the same weights), and Forge against A1111."""

from __future__ import annotations

import itertools

import pytest
import torch

from lib_attn import settings as S
from lib_attn.methods.swg.core import SwgPlan, auto_side, join, plan_windows, starts, windows
from tests.fakes.a1111_double import a1111_host
from tests.fakes.forge_env import forge_host
from tests.support.helpers import SCRIPT, assert_no_leftovers
from tests.support.pag import BASE, record_plain_run, reference_guided

SQUARE = dict(BASE, width=128, height=128)


def swg_args(**kw):
    return S.defaults().with_values({"swg_enabled": True, **{f"swg_{k}": v for k, v in kw.items()}}).to_args()


def test_window_layout_covers_the_latent_with_the_least_overlap():
    assert starts(128, 96, 32) == [0, 32]  # SDXL 1024 px, 768 px windows, 256 px overlap: two per axis
    assert starts(16, 16, 4) == [0] and starts(10, 16, 4) == [0]
    assert starts(64, 8, 16) == [round(i * 56 / 14) for i in range(15)]  # the overlap is capped at half a window
    for side, win, ov in ((128, 96, 32), (75, 40, 8), (97, 24, 0), (16, 12, 4)):
        s = starts(side, win, ov)
        assert s[0] == 0 and s[-1] == side - win
        assert all(b - a <= win - ov for a, b in itertools.pairwise(s)), s  # at least `ov` shared
    assert auto_side(64) == 48 and auto_side(128) == 96 and auto_side(75) == 56 and auto_side(10) == 7
    wins = windows(13, 21, 9, 15, 2)
    cover = torch.zeros(13, 21, dtype=torch.float64)
    for ys, xs, w in wins:
        assert w.shape == (9, 15) and (w > 0).all()
        cover[ys, xs] += w
    assert (cover > 0).all()
    like = torch.randn(2, 4, 13, 21, dtype=torch.float64)
    same = [like[..., ys, xs] for ys, xs, _ in wins]
    assert torch.allclose(join(same, wins, like), like)  # windows that agree join to the same prediction
    plan = SwgPlan(5.0, 0, 128, 0.0, 1.0)
    assert len(plan_windows(plan, 128, 128, None)) == 4  # automatic: three quarters of each side
    assert len(plan_windows(plan, 64, 64, None)) == 4


def reference_windows(h, seen, cfg, scale, plan):
    """Independent loop: CFG plus ``scale * (cond - joined windows)``, the cond model run on each crop."""
    import k_diffusion.external

    den = k_diffusion.external.CompVisDenoiser(h.modules.shared.sd_model)

    def cond_dict(c):
        return {"c_crossattn": [c], "c_concat": [torch.zeros(c.shape[0], 5, 1, 1, dtype=c.dtype)]}

    def model_fn(x, sigma):
        u = den(x, sigma, cond=cond_dict(seen["uncond"]))
        c = den(x, sigma, cond=cond_dict(seen["cond"]))
        wins = plan_windows(plan, x.shape[-2], x.shape[-1], None)
        weak = join([den(x[..., ys, xs], sigma, cond=cond_dict(seen["cond"])) for ys, xs, _ in wins], wins, c)
        return u + cfg * (c - u) + scale * (c - weak)

    return reference_guided(h, seen, cfg, [], model_fn=model_fn)


@pytest.mark.parametrize(("window", "overlap"), [(0, 128), (96, 32)])
def test_swg_equals_independent_computation(window, overlap):
    cfg, scale = 5.0, 3.0
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        plain, seen = record_plain_run(h, cfg_scale=cfg, width=128, height=128)
        out = h.txt2img(**dict(SQUARE, cfg_scale=cfg, sampler_name="Euler"),
                        script_args=swg_args(scale=scale, window=window, overlap=overlap))
        ref = reference_windows(h, seen, cfg, scale, SwgPlan(scale, window, overlap, 0.0, 1.0))
        assert_no_leftovers(h)
    assert (out.samples - ref).abs().max() < 1e-5
    assert (out.samples - plain.samples).abs().max() > 1e-3
    assert f"SWG window: {window}" in out.infotexts[0]


def test_forge_matches_a1111_and_a_window_larger_than_the_image_fails():
    kw = dict(SQUARE, batch_size=2, sampler_name="Euler", cfg_scale=5.0)
    results = {}
    for name, make in (("a1111", a1111_host), ("forge", forge_host)):
        with make("sd1") as h:
            h.load_script(SCRIPT)
            results[name] = (h.txt2img(**kw, script_args=swg_args()).samples, h.txt2img(**kw).samples)
            with pytest.raises(S.SettingsError) as e:
                h.txt2img(**kw, script_args=swg_args(window=256))
            assert e.value.field == "swg.window" and "larger than the image (128x128" in str(e.value)
            assert h.callback_count() == 0
            h.txt2img(**kw)  # the host keeps working
    (a, a_plain), (f, f_plain) = results["a1111"], results["forge"]
    delta_a, delta_f = a - a_plain, f - f_plain
    assert delta_f.abs().max() > 1e-2
    assert (delta_a - delta_f).abs().max() < 1e-3 * delta_a.abs().max()


def test_with_tpg_apg_and_hires_sdxl():
    kw = dict(BASE, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5, sampler_name="Euler")
    args = S.defaults().with_values({"swg_enabled": True, "swg_hires": "own", "swg_hires_scale": 2.0,
                                     "tpg_enabled": True, "tpg_layers": "input", "apg_enabled": True}).to_args()
    for make in (a1111_host, forge_host):
        with make("sdxl") as h:
            h.load_script(SCRIPT)
            plain = h.txt2img(**kw).samples
            out = h.txt2img(**kw, script_args=args)
            assert h.callback_count() == 0
        assert torch.isfinite(out.samples).all() and (out.samples - plain).abs().max() > 1e-3
        assert "SWG hires scale: 2" in out.infotexts[0]
