"""A1111's own memory options with every method, on the A1111 double: ``--medvram``, ``--lowvram`` and the
"sdp-no-mem" attention forward (``--opt-sdp-no-mem-attention``; "sdp" is the double's default).

Under ``--medvram``/``--lowvram`` the double keeps A1111's bookkeeping of which piece of the model is on the GPU
(``modules/lowvram.py``: the VAE and the text encoder send the UNet away; the UNet, or under ``--lowvram`` each of
its blocks, comes back through a forward pre-hook) and raises, as a GPU would, when a UNet module runs while its
weights are elsewhere.  Each method's generation must then equal, pixel for pixel, the same generation without the
option (the options move weights, they change no arithmetic), and leave nothing of ours behind.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib_attn import settings as S
from tests.fakes.a1111_double import a1111_host
from tests.support.helpers import SCRIPT, assert_no_leftovers


def _img(seed: int, size=(64, 64)):
    from PIL import Image

    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _values(**values):
    return S.defaults().with_values(values).to_args()


# method -> (generation, its arguments beyond the common ones, script args)
CASES = {
    "pag": ("txt2img", {}, lambda: _values(pag_enabled=True, pag_scale=3.0)),
    "seg": ("txt2img", {}, lambda: _values(seg_enabled=True, seg_scale=3.0)),
    "sag": ("txt2img", {}, lambda: _values(sag_enabled=True, sag_scale=0.75)),
    "nag": ("txt2img", {"cfg_scale": 1.0}, lambda: _values(nag_enabled=True, nag_scale=5.0)),
    "tpg": ("txt2img", {}, lambda: _values(tpg_enabled=True, tpg_scale=3.0)),
    "swg": ("txt2img", {}, lambda: _values(swg_enabled=True, swg_scale=3.0)),
    "cfg_stage": ("txt2img", {}, lambda: _values(apg_enabled=True, cfg_zero_enabled=True, fdg_enabled=True)),
    "ag": ("txt2img", {}, lambda: _values(ag_enabled=True, ag_threshold=0.9)),
    "style": ("txt2img", {}, lambda: [{"style": {"reference": _img(1), "checkpointing": "on"}}]),
    "style_transfer": ("img2img", {}, lambda: [{"style": {"reference": _img(1), "mode": "transfer"}}]),
    "colorize": ("img2img", {"cfg_scale": 1.0, "prompt": ""}, lambda: [{"colorize": {"reference": _img(2)}}]),
    "colorize_paper": ("img2img", {"cfg_scale": 1.0, "prompt": ""},
                       lambda: [{"colorize": {"reference": _img(2), "paper": True, "passes": 2}}]),
    "edit_mask": ("img2img", {}, lambda: [{"edit_mask": {}}]),
    "masked_upscale": ("hires", {}, lambda: [{"yoda": {"source": "unet"}}]),
}
OPTIONS = {
    "medvram": {"medvram": True},
    "lowvram": {"lowvram": True},
    "sdp-no-mem": {"opt_sdp_no_mem_attention": True},
}


def _generate(h, case: str):
    job, extra, script_args = CASES[case]
    kw = dict(prompt="a red fox", negative_prompt="blurry", seed=3, steps=3, cfg_scale=5.0, width=64, height=64,
              sampler_name="Euler", batch_size=2)  # fmt: skip
    kw.update(extra)
    if job == "img2img":
        kw.update(init_images=[_img(0)], denoising_strength=0.6)
        out = h.img2img(**kw, script_args=script_args())
    else:
        if job == "hires":
            kw.update(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5)
        out = h.txt2img(**kw, script_args=script_args())
    return [np.asarray(im) for im in out.images]


@pytest.fixture(scope="module")
def plain_images():
    """Every case's images with no memory option (one host)."""
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        return {case: _generate(h, case) for case in CASES}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_method_under_the_webuis_memory_options(option, plain_images):
    with a1111_host("sd1", cmd_opts=OPTIONS[option]) as h:
        h.load_script(SCRIPT)
        model = h.modules.shared.sd_model
        assert model.lowvram == (option != "sdp-no-mem")
        for case in CASES:
            got = _generate(h, case)
            for a, b in zip(got, plain_images[case], strict=True):
                assert np.array_equal(a, b), f"{case} under {option} differs from the same generation without it"
            assert_no_leftovers(h)
        if option != "sdp-no-mem":  # A1111's own hooks are still there, and still work
            from modules import lowvram

            unet = model.model.diffusion_model
            hooked = model.model if option == "medvram" else unet.input_blocks[0]
            assert any(f.__name__ == "send_me_to_gpu" for f in hooked._forward_pre_hooks.values())
            h.txt2img(prompt="a", seed=1, steps=1, width=64, height=64, sampler_name="Euler")
            assert lowvram.module_in_gpu is not None


@pytest.mark.parametrize("option", ["medvram", "lowvram"])
def test_the_doubles_placement_check_catches_a_call_around_the_webuis_hooks(option):
    """What the test above relies on: right after a VAE encode the UNet's weights are on the CPU, and a call made
    straight to a UNet part (not through ``sd_model.model`` or the blocks' own forwards) raises."""
    with a1111_host("sd1", cmd_opts=OPTIONS[option]) as h:
        model = h.modules.shared.sd_model
        unet = model.model.diffusion_model
        x = torch.zeros(1, 4, 8, 8)
        model.encode_first_stage(torch.zeros(1, 3, 64, 64))
        with pytest.raises(RuntimeError, match="same device"):
            unet.input_blocks[1][1](torch.zeros(1, 32, 8, 8), context=torch.zeros(1, 77, 32))
        model.encode_first_stage(torch.zeros(1, 3, 64, 64))
        model.apply_model(x, torch.tensor([500.0]), {"c_crossattn": [torch.zeros(1, 77, 32)]})  # through the hooks
        if option == "medvram":  # a whole-UNet call around sd_model.model
            model.encode_first_stage(torch.zeros(1, 3, 64, 64))
            with pytest.raises(RuntimeError, match="same device"):
                unet(x, torch.tensor([500.0]), context=torch.zeros(1, 77, 32))
