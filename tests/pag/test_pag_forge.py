"""PAG on the Forge 2.x double: post-CFG function on a UNet-patcher clone with an attn1 replace patch."""

from __future__ import annotations

import pytest
import torch

from lib_attn import settings as S
from tests.fakes.forge_env import forge_host
from tests.support.helpers import SCRIPT
from tests.support.pag import pag_args

BASE = dict(prompt="a red cube", negative_prompt="blurry", seed=5, steps=3, cfg_scale=5.0, width=128, height=128)


def test_off_is_bit_identical():
    with forge_host("sd1") as h:
        plain = h.txt2img(**BASE, batch_size=2).samples
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        off = h.txt2img(**BASE, batch_size=2, script_args=S.defaults().to_args()).samples
        zero = h.txt2img(**BASE, batch_size=2, script_args=pag_args(scale=0.0)).samples
        assert h.callback_count() == 0
    assert torch.equal(plain, off)
    assert torch.equal(plain, zero)


def test_forge_matches_a1111_path():
    """Same tiny weights, seed and sampler: Forge's post-CFG PAG equals the A1111 batched PAG."""
    from tests.fakes.a1111_double import a1111_host

    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        a = h.txt2img(**BASE, batch_size=2, sampler_name="Euler", script_args=pag_args(scale=2.0)).samples
        a_plain = h.txt2img(**BASE, batch_size=2, sampler_name="Euler").samples
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        f = h.txt2img(**BASE, batch_size=2, sampler_name="Euler", script_args=pag_args(scale=2.0)).samples
        f_plain = h.txt2img(**BASE, batch_size=2, sampler_name="Euler").samples
        assert h.callback_count() == 0
    # Forge rounds sigma to the nearest trained timestep and batches differently, so plain runs agree only to
    # float noise scaled by the values; compare the PAG effect itself
    scale = a_plain.abs().max()
    assert (a_plain - f_plain).abs().max() < 1e-4 * scale, "the two doubles must agree without PAG"
    delta_a, delta_f = a - a_plain, f - f_plain
    assert delta_f.abs().max() > 1e-2
    assert (delta_a - delta_f).abs().max() < 1e-3 * delta_a.abs().max()


def test_hires_cfg1_without_uncond_and_double_hook_call():
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        kw = dict(BASE, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5, hr_cfg=1.0)
        plain = h.txt2img(**kw, script_args=pag_args(hires="off")).samples
        on = h.txt2img(**kw, script_args=pag_args()).samples
        assert h.callback_count() == 0
    assert (plain - on).abs().max() > 1e-4  # PAG acted in the hires pass although it has no uncond


def test_unsupported_model_is_a_clear_error():
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        h.modules.sd_models.load_unsupported()  # a Flux-like model without UNet attention layers
        with pytest.raises(Exception, match="Attention Toolkit"):
            h.txt2img(**BASE, script_args=pag_args())


def test_hook_twice_per_hires_pass_patches_once_and_calls_are_cond_only():
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        kw = dict(BASE, batch_size=2, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5,
                  hr_cfg=5.0, sampler_name="Euler")
        h.txt2img(**kw, script_args=pag_args())
        calls = h.unet_calls
        perturbed = [c for c in calls if c["rows"] == 2 and c["cond_or_uncond"] == [0]]
        main = [c for c in calls if 1 in c["cond_or_uncond"]]  # the CFG call (cond + uncond) of each step
        # one extra cond-only call of B rows per step in both passes, never two (no double registration)
        assert len(main) > BASE["steps"]  # the hires pass ran
        assert len(perturbed) == len(main)
        assert h.callback_count() == 0


def test_api_named_form_on_forge():
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        status, res = h.api_txt2img({**BASE, "alwayson_scripts": {"attention toolkit": {"args": [{"pag": {"scale": 2.5}}]}}})
        assert status == 200, res
        assert "PAG scale: 2.5" in res["info"]
