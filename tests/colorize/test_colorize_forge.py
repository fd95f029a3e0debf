"""Reference colorization on the Forge 2.x double: a model-function wrapper that captures the streams in one
extra call per step, an attn1 replace patch with the dual attention, the guidance in the post-CFG function."""

from __future__ import annotations

import torch

from lib_attn import color
from lib_attn import settings as S
from tests.fakes.forge_env import forge_host
from tests.support.helpers import SCRIPT
from tests.support.images import lightness, photo, psnr, small

BASE = dict(prompt="", negative_prompt="", seed=5, steps=4, cfg_scale=2.0, width=96, height=80, sampler_name="Euler",
            denoising_strength=0.6)


def gray(img):
    return color.tensor_to_pil(color.luminance_only(color.pil_to_tensor(img)))


def test_off_is_bit_identical():
    init = small("cheetah1.jpg")
    with forge_host("sd1") as h:
        plain = h.img2img(**BASE, init_images=[init]).samples
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        off = h.img2img(**BASE, init_images=[init], script_args=S.defaults().to_args()).samples
        named_off = h.img2img(**BASE, init_images=[init],
                              script_args=[{"colorize": {"enabled": False, "reference": init}}]).samples
        assert h.callback_count() == 0
    assert torch.equal(plain, off)
    assert torch.equal(plain, named_off)


def test_plumbing_is_neutral_and_the_transfer_acts():
    """Strength 0, guidance 1, no AdaIN: the capture calls and patches change nothing, the samples equal plain
    img2img of the gray input.  Strength 1 changes them, and the guidance scale changes them further."""
    init, ref = small("cheetah1.jpg"), photo("lion.jpg")
    neutral = {"reference": ref, "strength": 0.0, "guidance": 1.0, "adain": False}
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        plain = h.img2img(**BASE, init_images=[gray(init)]).samples
        zero = h.img2img(**BASE, init_images=[init], script_args=[{"colorize": neutral}]).samples
        moved = h.img2img(**BASE, init_images=[init], script_args=[{"colorize": {**neutral, "strength": 1.0}}]).samples
        guided = h.img2img(**BASE, init_images=[init], script_args=[{"colorize": {**neutral, "strength": 1.0,
                                                                                  "guidance": 4.0}}]).samples
        assert h.callback_count() == 0
    assert (zero - plain).abs().max() < 1e-5
    assert (moved - plain).abs().max() > 1e-2
    assert (guided - moved).abs().max() > 1e-2


def test_batch_references_lightness_and_pag_together():
    init = photo("cheetah2.jpg")
    refs = [photo("lion.jpg"), photo("cheetah1.jpg")]
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        out = h.img2img(**BASE, batch_size=2, init_images=[init],
                        script_args=[{"colorize": {"reference": refs}, "pag": {"scale": 2.0}}])
        single = h.img2img(**{**BASE, "seed": BASE["seed"] + 1}, init_images=[init],
                           script_args=[{"colorize": {"reference": refs[1]}, "pag": {"scale": 2.0}}])
        assert h.callback_count() == 0
    assert "PAG scale: 2" in out.infotexts[0] and "Colorize guidance: 10" in out.infotexts[0]
    for img in out.images[-2:]:  # Forge puts the grid first
        assert img.size == init.size
        assert psnr(lightness(init), lightness(img), 100.0) >= 45.0
    assert (out.samples[1] - single.samples[0]).abs().max() < 1e-4 * single.samples.abs().max()
