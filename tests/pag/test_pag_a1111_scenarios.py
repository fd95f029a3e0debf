"""PAG on the A1111 double in the situations users hit: AND prompts, long prompts (chunked calls), skipped
uncond, DDIM (eps), hires fix (override, own checkpoint), img2img + mask, SDXL dict conds, batches,
exceptions and interrupts.  Each checks that no patch, hook or callback is left behind."""

from __future__ import annotations

import pytest
import torch

from lib_attn import settings as S
from tests.fakes.a1111_double import a1111_host
from tests.support.helpers import SCRIPT, assert_no_leftovers
from tests.support.pag import identity_on, pag_args

BASE = dict(prompt="a red cube", negative_prompt="blurry", seed=3, steps=3, cfg_scale=5.0, width=96, height=80)
MID = ["middle_block.1.transformer_blocks.0.attn1"]


def unet_of(h):
    return h.modules.shared.sd_model.model.diffusion_model


def record_calls(h):
    calls: list[int] = []
    handle = unet_of(h).register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    return calls, handle


def run_both_batching(h, **kw):
    """The same generation with batch_cond_uncond on (one call) and off (chunks): float64 results agree."""
    out = []
    for flag in (True, False):
        h.modules.shared.opts.batch_cond_uncond = flag
        out.append(h.txt2img(**kw).samples)
    h.modules.shared.opts.batch_cond_uncond = True
    return out


@pytest.fixture
def h64():
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        yield h


def test_and_prompts_use_each_images_first_subprompt(h64):
    import k_diffusion.external
    import k_diffusion.sampling

    kw = dict(BASE, prompt="a red cube AND a blue ball:0.5", batch_size=2, sampler_name="Euler")
    seen = {}

    def grab(params):
        if "cond" not in seen:
            seen.update(cond=params.text_cond.clone(), uncond=params.text_uncond.clone(), x=params.x[-2:].clone())
        seen.setdefault("sigmas", []).append(float(params.sigma[0]))

    cb = h64.modules.script_callbacks
    cb.on_cfg_denoiser(grab)
    h64.txt2img(**kw)
    cb.remove_callbacks_for_function(grab)
    assert seen["cond"].shape[0] == 4  # 2 images x 2 sub-prompts

    calls, handle = record_calls(h64)
    out = h64.txt2img(**kw, script_args=pag_args(scale=2.0)).samples
    handle.remove()
    assert calls == [4 + 2 + 2] * kw["steps"]  # cond rows + perturbed rows + uncond rows, one call

    model = h64.modules.shared.sd_model
    den = k_diffusion.external.CompVisDenoiser(model)
    mods = [unet_of(h64).get_submodule(p) for p in MID]
    zeros = torch.zeros(2, 5, 1, 1, dtype=torch.float64)

    def cd(c):
        return {"c_crossattn": [c], "c_concat": [zeros]}

    def f(x, sigma):
        u = den(x, sigma, cond=cd(seen["uncond"]))
        c0 = den(x, sigma, cond=cd(seen["cond"][[0, 2]]))
        c1 = den(x, sigma, cond=cd(seen["cond"][[1, 3]]))
        with identity_on(mods):
            p0 = den(x, sigma, cond=cd(seen["cond"][[0, 2]]))
        return u + 5.0 * (c0 - u) + 5.0 * 0.5 * (c1 - u) + 2.0 * (c0 - p0)

    with torch.no_grad():
        ref = k_diffusion.sampling.sample_euler(f, seen["x"], torch.tensor([*seen["sigmas"], 0.0]), disable=True)
    assert (out - ref).abs().max() < 1e-5
    assert_no_leftovers(h64)


def test_long_prompt_unequal_token_lengths_chunked_calls(h64):
    long_prompt = " ".join(f"word{i}" for i in range(90))  # 154 tokens vs 77 for the negative prompt
    kw = dict(BASE, prompt=long_prompt, batch_size=1, sampler_name="Euler", script_args=pag_args())
    calls, handle = record_calls(h64)
    a, b = run_both_batching(h64, **kw)
    handle.remove()
    # batch_cond_uncond on: cond rows (1 + 1 perturbed) in one call, then the uncond row alone; off: chunks of 1
    assert calls[:2] == [2, 1]
    assert calls[3 * 2 : 3 * 2 + 3] == [1, 1, 1]
    assert (a - b).abs().max() < 1e-9
    plain = h64.txt2img(**{**kw, "script_args": None}).samples
    assert (a - plain).abs().max() > 1e-4
    assert_no_leftovers(h64)


def test_skip_early_cond_keeps_pag_rows(h64):
    h64.modules.shared.opts.skip_early_cond = 0.5
    kw = dict(BASE, batch_size=2, sampler_name="Euler", steps=4, script_args=pag_args())
    calls, handle = record_calls(h64)
    a, b = run_both_batching(h64, **kw)
    handle.remove()
    assert calls[:4] == [4, 4, 4, 6]  # steps 0-2 (step/total <= 0.5) drop the 2 uncond rows; perturbed rows stay
    assert (a - b).abs().max() < 1e-9
    assert_no_leftovers(h64)


@pytest.mark.parametrize("sampler", ["DDIM", "Heun", "DPM++ 2M", "Euler a", "DPM++ SDE"])
def test_every_sampler_kind(h64, sampler):
    kw = dict(BASE, batch_size=2, sampler_name=sampler, script_args=pag_args())
    a, b = run_both_batching(h64, **kw)
    plain = h64.txt2img(**{**kw, "script_args": None}).samples
    assert (a - b).abs().max() < 1e-9
    assert (a - plain).abs().max() > 1e-4
    assert_no_leftovers(h64)


def test_hires_override_modes_and_checkpoint_switch():
    from tests.support.tiny import make_sd_model

    with a1111_host("sd1", models={"other": lambda: make_sd_model("sd1", seed=7)}) as h:
        h.load_script(SCRIPT)
        first = h.modules.shared.sd_model
        kw = dict(BASE, batch_size=1, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6)
        expected = {"same": [3, 3], "off": [3, 2], "own": [3, 3]}
        for mode, (first_rows, hr_rows) in expected.items():
            calls, handle = record_calls(h)
            h.txt2img(**kw, script_args=pag_args(hires=mode, hires_scale=1.0))
            handle.remove()
            n1 = kw["steps"]
            assert set(calls[:n1]) == {first_rows}, mode
            assert set(calls[n1:]) == {hr_rows}, mode
        # own checkpoint for the hires pass: the patches follow the model switch, none stay on either model
        out = h.txt2img(**kw, hr_checkpoint_name="other", script_args=pag_args())
        second = h.modules.shared.sd_model
        assert second is not first
        assert "PAG scale: 3" in out.infotexts[0]
        for model in (first, second):
            for m in model.model.diffusion_model.modules():
                assert "forward" not in m.__dict__ and not m._forward_pre_hooks
        assert h.callback_count() == 0


def test_img2img_inpaint_mask_and_batches():
    from PIL import Image

    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        img = Image.new("RGB", (96, 80), (120, 40, 200))
        mask = Image.new("L", (96, 80), 0)
        mask.paste(255, (0, 0, 48, 80))  # regenerate the left half only
        kw = dict(BASE, init_images=[img], mask=mask, denoising_strength=0.7, batch_size=2, n_iter=2)
        plain = h.img2img(**kw).samples
        calls, handle = record_calls(h)
        out = h.img2img(**kw, script_args=pag_args())
        handle.remove()
        assert out.samples.shape[0] == 4
        assert set(calls) == {6}  # both batches of the generation carry the perturbed rows
        diff = (out.samples - plain).abs()
        assert diff[..., :6].max() > 1e-4  # masked (regenerated) columns change
        assert diff[..., 7:].max() < 1e-6  # kept columns stay the original
        assert_no_leftovers(h)


@pytest.mark.parametrize("kind", ["sdxl", "sd2"])
def test_sdxl_dict_conds_and_sd2_v_prediction(kind):
    """SDXL: dict conds, ten transformer blocks in the middle; SD2: v-prediction, linear proj_in."""
    with a1111_host(kind, dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        kw = dict(BASE, batch_size=2, sampler_name="Euler", width=128, height=128, script_args=pag_args())
        a, b = run_both_batching(h, **kw)
        plain = h.txt2img(**{**kw, "script_args": None}).samples
        assert (a - b).abs().max() < 1e-9
        assert (a - plain).abs().max() > 1e-4
        assert_no_leftovers(h)


def test_exception_mid_sampling_and_interrupt_leave_nothing():
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        unet = unet_of(h)
        count = {"n": 0}

        def boom(module, args):
            count["n"] += 1
            if count["n"] == 2:
                raise RuntimeError("injected failure")

        handle = unet.register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="injected failure"):
            h.txt2img(**BASE, script_args=pag_args())
        handle.remove()
        assert_no_leftovers(h)

        h.modules.shared.state.interrupt_at_step = 2
        out = h.txt2img(**BASE, script_args=pag_args())
        assert out.samples is not None
        assert_no_leftovers(h)
        h.modules.shared.state.reset()
        # the next generation equals a fresh one
        again = h.txt2img(**BASE, script_args=pag_args()).samples
    with a1111_host("sd1") as fresh:
        fresh.load_script(SCRIPT)
        assert torch.equal(fresh.txt2img(**BASE, script_args=pag_args()).samples, again)


def test_bad_settings_fail_the_generation_with_the_field_name():
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        with pytest.raises(S.SettingsError, match=r"PAG scale \(pag.scale\)"):
            h.txt2img(**BASE, script_args=[True, "lots"])
        with pytest.raises(S.SettingsError, match=r"Layers \(pag.layers\): 'output.2' matched no layer"):
            h.txt2img(**BASE, script_args=pag_args(layers="output.2"))
        assert_no_leftovers(h)
        h.txt2img(**BASE)  # and the WebUI keeps serving
