"""The CFG-stage methods (APG, CFG-Zero*, FDG, AG).

Each rule is checked on identical tensors against diffusers' guiders (an independent implementation on PyPI: APG's
``normalized_guidance``, ``ClassifierFreeZeroStarGuidance``, ``FrequencyDecoupledGuidance`` on kornia's pyramid) or
against the paper's formula written here; end to end, a run on each WebUI double equals an independent sampling loop
(separate uncond and cond model calls, the rule applied to them, the real k-diffusion Euler sampler)."""

from __future__ import annotations

import pytest
import torch
from diffusers.guiders import ClassifierFreeZeroStarGuidance, FrequencyDecoupledGuidance
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

from lib_attn import settings as S
from lib_attn.cfg import plain_cfg
from lib_attn.methods.ag.core import similarity
from lib_attn.methods.apg.core import ApgPlan, apg
from lib_attn.methods.cfg_zero.core import CfgZeroPlan, scaled_uncond
from lib_attn.methods.fdg.core import FdgPlan, fdg, parse_scales, pyramid, rebuild
from tests.fakes.a1111_double import a1111_host
from tests.fakes.forge_env import forge_host
from tests.support.helpers import SCRIPT, assert_no_leftovers
from tests.support.pag import BASE, record_plain_run

SQUARE = dict(BASE, width=128, height=128)


def args(**values):
    return S.defaults().with_values(values).to_args()


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- the rules on identical tensors ------------------------------------------------------------
@pytest.mark.parametrize(("eta", "r", "beta"), [(0.0, 15.0, -0.5), (1.0, 5.0, 0.0), (0.3, 0.0, -0.75), (0.0, 2.0, 0.4)])
def test_apg_equals_diffusers_normalized_guidance(eta, r, beta):
    """Three steps with the momentum carried over; diffusers' original formulation with scale w - 1 is the paper's
    ``c + (w - 1) * update``."""
    w, plan = 7.0, ApgPlan(eta, r, beta, 0.0, 1.0)
    buffer, running = MomentumBuffer(beta) if beta else None, None
    for step in range(3):
        c, u = randn(2, 4, 12, 10, seed=2 * step) * 3, randn(2, 4, 12, 10, seed=2 * step + 1) * 3
        ours, running = apg(c, u, w, plan, running)
        ref = normalized_guidance(c, u, w - 1, buffer, eta, r, use_original_formulation=True)
        assert torch.allclose(ours, ref, atol=1e-10), step
    plain = ApgPlan(1.0, 0.0, 0.0, 0.0, 1.0)  # eta 1, no cap, no momentum: plain CFG
    assert torch.allclose(apg(c, u, w, plain, None)[0], plain_cfg(c, u, w), atol=1e-12)


@pytest.mark.parametrize("w", [1.5, 5.0, 12.0])
def test_cfg_zero_star_equals_diffusers_on_the_noise_predictions(w):
    """On x0 predictions of the input ``x`` at ``sigma``, the rule equals diffusers' CFG-Zero* on the noise
    predictions ``(x - d) / sigma`` (the paper's velocity rule); zero-init gives ``d = x``."""
    x, sigma = randn(2, 4, 8, 8, seed=1) * 5, torch.tensor([3.0, 0.7], dtype=torch.float64).view(-1, 1, 1, 1)
    eps_c, eps_u = randn(2, 4, 8, 8, seed=2), randn(2, 4, 8, 8, seed=3) * 0.8 + randn(2, 4, 8, 8, seed=2) * 0.5
    c, u = x - sigma * eps_c, x - sigma * eps_u
    ours = plain_cfg(c, scaled_uncond(x, c, u), w)
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=1)
    guider._step = 1
    eps = guider.forward(eps_c, eps_u)[0]
    assert torch.allclose(ours, x - sigma * eps, atol=1e-9)
    guider._step = 0
    assert torch.equal(guider.forward(eps_c, eps_u)[0], torch.zeros_like(eps_c))  # what zero-init means: d = x
    plan = CfgZeroPlan(1, 0.0, 0.0, 1.0)
    assert plan.zeroed(0, 20) and not plan.zeroed(1, 20)
    assert CfgZeroPlan(1, 0.1, 0.0, 1.0).zeroed(1, 20) and not CfgZeroPlan(1, 0.1, 0.0, 1.0).zeroed(2, 20)


@pytest.mark.parametrize(("w", "low", "size"), [(7.0, 0.5, (64, 64)), (10.0, 0.5, (96, 64)), (4.0, 0.3, (128, 128))])
def test_fdg_equals_diffusers_frequency_decoupled_guidance(w, low, size):
    """Two bands (the paper's), scales finest first; sizes where kornia pads nothing (it pads some others to a power of two, which diffusers then fails to rebuild), and no band at scale 1 (diffusers then appends the wrong band)."""
    c, u = randn(2, 4, *size, seed=5, dtype=torch.float32), randn(2, 4, *size, seed=6, dtype=torch.float32)
    plan = FdgPlan(2, low, (), 0.0, 1.0)
    scales = plan.scales(w)
    assert scales == [w, max(1.0, w * low)]
    ref = FrequencyDecoupledGuidance(guidance_scales=scales).forward(c, u)[0]
    assert (fdg(c, u, scales, plain_cfg) - ref).abs().max() < 1e-5


def test_fdg_pyramid_rebuilds_any_size_and_equal_scales_are_cfg():
    for size in ((13, 21), (6, 7), (64, 64)):
        x = randn(1, 4, *size, seed=7)
        levels = 2 if min(size) < 12 else 3
        assert torch.allclose(rebuild(pyramid(x, levels)), x, atol=1e-12), size
    c, u = randn(2, 4, 25, 19, seed=8), randn(2, 4, 25, 19, seed=9)
    assert torch.allclose(fdg(c, u, [6.0, 6.0, 6.0], plain_cfg), plain_cfg(c, u, 6.0), atol=1e-10)
    assert FdgPlan(4, 0.5, (), 0, 1).scales(10.0) == pytest.approx([10.0, 25 / 3, 20 / 3, 5.0], abs=1e-12)
    assert FdgPlan(3, 0.5, parse_scales("12, , 2", 3), 0, 1).scales(8.0) == [12.0, 6.0, 2.0]
    with pytest.raises(ValueError):
        parse_scales("1, 2, 3", 2)


def test_ag_similarity_is_torch_cosine_similarity():
    x, c, u = randn(3, 4, 8, 8, seed=1), randn(3, 4, 8, 8, seed=2), randn(3, 4, 8, 8, seed=3)
    cos = torch.nn.CosineSimilarity(dim=1)
    assert torch.allclose(similarity(x, c, u, "denoised"), cos(c.flatten(1), u.flatten(1)))
    assert torch.allclose(similarity(x, c, u, "noise"), cos((x - c).flatten(1), (x - u).flatten(1)))


# ---- end to end ----------------------------------------------------------------------------------
def reference_loop(h, seen, cfg, rule, skip_from=None):
    """Separate uncond and cond calls per step, ``rule(x, c, u, i)`` (i: the step) combines them; from step
    ``skip_from`` on, no uncond call and the cond prediction alone.  The real Euler sampler."""
    import k_diffusion.external
    import k_diffusion.sampling

    model = h.modules.shared.sd_model
    den = k_diffusion.external.CompVisDenoiser(model)
    step = {"i": 0, "uncond_calls": 0}

    def cond_dict(c):
        return {"c_crossattn": [c], "c_concat": [torch.zeros(c.shape[0], 5, 1, 1, dtype=c.dtype)]}

    def f(x, sigma):
        i = step["i"]
        step["i"] += 1
        c = den(x, sigma, cond=cond_dict(seen["cond"]))
        if skip_from is not None and i >= skip_from:
            return c
        step["uncond_calls"] += 1
        u = den(x, sigma, cond=cond_dict(seen["uncond"]))
        return rule(x, c, u, i)

    sigmas = torch.tensor([*seen["sigmas"], 0.0])
    with torch.no_grad():
        out = k_diffusion.sampling.sample_euler(f, seen["x0"] * 1.0, sigmas, disable=True)
    return out, step["uncond_calls"]


def apg_rule(w, plan):
    state = {"running": None}

    def rule(x, c, u, i):
        out, state["running"] = apg(c, u, w, plan, state["running"])
        return out

    return rule


CASES = {
    "apg": (
        {"apg_enabled": True, "apg_eta": 0.2, "apg_norm_threshold": 4.0, "apg_momentum": -0.5},
        lambda w: apg_rule(w, ApgPlan(0.2, 4.0, -0.5, 0.0, 1.0)),
    ),
    "cfg_zero": (
        {"cfg_zero_enabled": True},
        lambda w: lambda x, c, u, i: x if i == 0 else plain_cfg(c, scaled_uncond(x, c, u), w),
    ),
    "fdg": (
        {"fdg_enabled": True, "fdg_low_share": 0.3},
        lambda w: lambda x, c, u, i: fdg(c, u, [w, max(1.0, 0.3 * w)], plain_cfg),
    ),
    "fdg+apg": (
        {
            "fdg_enabled": True,
            "fdg_scales": "9, 2",
            "apg_enabled": True,
            "apg_momentum": 0.0,
            "apg_norm_threshold": 0.0,
        },
        lambda w: (
            lambda x, c, u, i: fdg(c, u, [9.0, 2.0], lambda a, b, s, k: apg(a, b, s, ApgPlan(0, 0, 0, 0, 1), None)[0])
        ),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("batch_cond_uncond", [True, False])
def test_equals_an_independent_sampling_loop(case, batch_cond_uncond):
    values, make_rule = CASES[case]
    cfg = 6.0
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        h.modules.shared.opts.batch_cond_uncond = batch_cond_uncond
        plain, seen = record_plain_run(h, cfg_scale=cfg, width=128, height=128)
        out = h.txt2img(**dict(SQUARE, cfg_scale=cfg, sampler_name="Euler"), script_args=args(**values))
        ref, _ = reference_loop(h, seen, cfg, make_rule(cfg))
        assert_no_leftovers(h)
    assert (out.samples - ref).abs().max() < 1e-5
    assert (out.samples - plain.samples).abs().max() > 1e-3


def test_ag_skips_the_uncond_pass_once_predictions_agree():
    """With a threshold the tiny model's predictions reach, the uncond rows stop being computed on A1111 and Forge,
    and the result equals the independent loop that drops the uncond call from that step on."""
    cfg, values = 5.0, {"ag_enabled": True, "ag_threshold": 0.9}
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        plain, seen = record_plain_run(h, cfg_scale=cfg, width=128, height=128, steps=6)
        kw = dict(SQUARE, cfg_scale=cfg, sampler_name="Euler", steps=6)
        h.unet_calls.clear() if hasattr(h, "unet_calls") else None
        out = h.txt2img(**kw, script_args=args(**values))
        # where the rule switches: the first step whose predictions agree (recorded by a plain reference loop)
        sims = []
        reference_loop(
            h,
            seen,
            cfg,
            lambda x, c, u, i: sims.append(float(similarity(x, c, u, "denoised").min())) or plain_cfg(c, u, cfg),
        )
        first = next(i for i, s in enumerate(sims) if s >= 0.9)
        ref, uncond_calls = reference_loop(h, seen, cfg, lambda x, c, u, i: plain_cfg(c, u, cfg), skip_from=first + 1)
        assert_no_leftovers(h)
    assert first + 1 < 6, sims  # the test means something only if AG switched CFG off before the end
    assert uncond_calls == first + 1
    assert (out.samples - ref).abs().max() < 1e-5
    assert (out.samples - plain.samples).abs().max() > 1e-4
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        h.txt2img(**kw, script_args=args(**values))
        flags = [c["cond_or_uncond"] for c in h.unet_calls]
    assert [1 in f for f in flags] == [True] * (first + 1) + [False] * (6 - first - 1), flags


@pytest.mark.parametrize("case", list(CASES))
def test_forge_matches_a1111(case):
    values, _ = CASES[case]
    kw = dict(SQUARE, batch_size=2, sampler_name="Euler", cfg_scale=6.0)
    results = {}
    for name, make in (("a1111", a1111_host), ("forge", forge_host)):
        with make("sd1") as h:
            h.load_script(SCRIPT)
            results[name] = (h.txt2img(**kw, script_args=args(**values)).samples, h.txt2img(**kw).samples)
            assert h.callback_count() == 0
    (a, a_plain), (f, f_plain) = results["a1111"], results["forge"]
    delta_a, delta_f = a - a_plain, f - f_plain
    assert delta_f.abs().max() > 1e-2
    assert (delta_a - delta_f).abs().max() < 1e-3 * delta_a.abs().max()


@pytest.mark.parametrize("make", [a1111_host, forge_host])
def test_off_and_cfg_one_leave_the_image_alone(make):
    every = {"apg_enabled": True, "cfg_zero_enabled": True, "fdg_enabled": True, "ag_enabled": True}
    with make("sd1") as h:
        plain = h.txt2img(**BASE, batch_size=2).samples
        plain_one = h.txt2img(**dict(BASE, cfg_scale=1.0), batch_size=2).samples
    with make("sd1") as h:
        h.load_script(SCRIPT)
        off = h.txt2img(**BASE, batch_size=2, script_args=S.defaults().to_args()).samples
        one = h.txt2img(**dict(BASE, cfg_scale=1.0), batch_size=2, script_args=args(**every)).samples
        assert h.callback_count() == 0
    assert torch.equal(plain, off)
    assert (one - plain_one).abs().max() < 1e-5


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a"])
def test_timestep_samplers_and_identities(sampler):
    """Settings that make each rule plain CFG (APG eta 1 with no cap or momentum; FDG with every band at the CFG
    scale) change nothing, also on A1111's DDIM, whose model predicts noise (the stage converts to x0 and back)."""
    identity = {
        "apg_enabled": True,
        "apg_eta": 1.0,
        "apg_norm_threshold": 0.0,
        "apg_momentum": 0.0,
        "fdg_enabled": True,
        "fdg_low_share": 1.0,
    }
    kw = dict(SQUARE, sampler_name=sampler, cfg_scale=6.0)
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        plain = h.txt2img(**kw).samples
        same = h.txt2img(**kw, script_args=args(**identity)).samples
        zero = h.txt2img(**kw, script_args=args(cfg_zero_enabled=True)).samples
    assert (same - plain).abs().max() < 1e-8
    assert torch.isfinite(zero).all() and (zero - plain).abs().max() > 1e-4


def test_with_pag_sag_nag_and_hires_sdxl():
    values = {
        "apg_enabled": True,
        "fdg_enabled": True,
        "cfg_zero_enabled": True,
        "ag_enabled": True,
        "pag_enabled": True,
        "pag_scale": 1.0,
        "sag_enabled": True,
        "nag_enabled": True,
    }
    kw = dict(BASE, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5, sampler_name="Euler")
    for make in (a1111_host, forge_host):
        with make("sdxl") as h:
            h.load_script(SCRIPT)
            plain = h.txt2img(**kw).samples
            out = h.txt2img(**kw, script_args=args(**values))
            assert h.callback_count() == 0
            if make is a1111_host:
                assert_no_leftovers(h)
        assert torch.isfinite(out.samples).all() and (out.samples - plain).abs().max() > 1e-3
        info = out.infotexts[0]
        for key in ("APG momentum: -0.5", "CFG-Zero zero steps: 1", "FDG levels: 2", "AG threshold: 0.99"):
            assert key in info, (key, info)


def test_bad_input_names_the_field():
    with pytest.raises(S.SettingsError) as e:
        args(fdg_enabled=True, fdg_scales="3, x")
    assert e.value.field == "fdg.scales"
    with pytest.raises(S.SettingsError) as e:
        args(apg_enabled=True, apg_norm_threshold=-1)
    assert e.value.field == "apg.norm_threshold"
    with a1111_host("sd1") as h:  # 5 bands need a latent of 48x48; this one is 10x12
        h.load_script(SCRIPT)
        with pytest.raises(S.SettingsError) as e:
            h.txt2img(**BASE, script_args=args(fdg_enabled=True, fdg_levels=5))
        assert e.value.field == "fdg.levels"
        assert_no_leftovers(h)
        h.txt2img(**BASE)  # the host keeps working


def test_forge_refuses_to_replace_another_cfg_function():
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        unet = h.modules.shared.sd_model.forge_objects.unet
        foreign = lambda a: a["cond"]  # noqa: E731 - another extension's CFG function
        for fo in ("forge_objects", "forge_objects_after_applying_lora", "forge_objects_original"):
            objs = getattr(h.modules.shared.sd_model, fo, None)
            if objs is not None:
                objs.unet.set_model_sampler_cfg_function(foreign)
        with pytest.raises(S.SettingsError) as e:
            h.txt2img(**BASE, script_args=args(apg_enabled=True))
        assert e.value.field == "apg.enabled" and "sampler_cfg_function" in str(e.value)
        del unet
