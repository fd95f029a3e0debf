"""PAG on the A1111 double equals diffusers' PAG (its own processors and guidance code) on the same weights."""

from __future__ import annotations

import pytest
import torch

from tests.fakes.a1111_double import a1111_host
from tests.support.diffusers_ref import diffusers_pag_eps, to_diffusers_unet
from tests.support.helpers import SCRIPT, assert_no_leftovers
from tests.support.pag import pag_args, record_plain_run

# latents divisible by 8: for other sizes the WebUI (resize the upsampled tensor to the skip connection) and diffusers
# (upsample straight to the skip's size) differ by design, which is not what this test is about
BASE = dict(prompt="a red cube", negative_prompt="blurry", seed=11, steps=3, cfg_scale=5.0, width=128, height=128)


def test_converted_unet_matches_ldm():
    from tests.support.tiny import make_unet

    unet = make_unet("sd1")
    dunet = to_diffusers_unet(unet)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([500.0, 20.0])
    with torch.no_grad():
        assert (unet(x, t, context=ctx) - dunet(x, t, encoder_hidden_states=ctx).sample).abs().max() < 1e-4


@pytest.mark.parametrize(("dtype", "steps", "tol"), [(torch.float32, 1, 1e-4), (torch.float64, 3, 1e-5)])
def test_pag_matches_diffusers_pag(dtype, steps, tol):
    """fp32: one step, compared as the guided noise prediction (diffusers' own output space) within 1e-4;
    fp64: a 3-step Euler run compared on the latents within 1e-5 (diffusers keeps its timestep embedding in fp32).  (In x0 space fp32 rounding is multiplied by
    sigma and by the guidance scales, so a latent-space 1e-4 bound would test float noise, not PAG.)"""
    import k_diffusion.external
    import k_diffusion.sampling

    base = dict(BASE, steps=steps)
    with a1111_host("sd1", dtype=dtype) as h:
        h.load_script(SCRIPT)
        plain, seen = record_plain_run(h, **base)
        out = h.txt2img(**base, sampler_name="Euler", script_args=pag_args(scale=3.0)).samples
        assert_no_leftovers(h)
        model = h.modules.shared.sd_model
        dunet = to_diffusers_unet(model.model.diffusion_model)
        den = k_diffusion.external.CompVisDenoiser(model)

        def f(x, sigma):  # k-diffusion's x0 from diffusers' guided eps: x - sigma * eps(x * c_in, t(sigma))
            c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
            t = den.sigma_to_t(sigma)
            eps = diffusers_pag_eps(dunet, x * c_in[:, None, None, None], t, seen["cond"], seen["uncond"], 5.0, 3.0)
            return x - sigma[:, None, None, None] * eps

        with torch.no_grad():
            ref = k_diffusion.sampling.sample_euler(f, seen["x0"], torch.tensor([*seen["sigmas"], 0.0]), disable=True)
    if steps == 1:  # one Euler step to sigma 0 returns the guided x0: compare eps = (x - x0) / sigma
        sigma0 = seen["sigmas"][0]
        out, ref = (seen["x0"] - out) / sigma0, (seen["x0"] - ref) / sigma0
    assert (out - ref).abs().max() < tol
    assert (out - plain.samples).abs().max() > 1e-2
