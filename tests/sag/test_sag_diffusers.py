"""SAG on the A1111 double equals diffusers' SAG pipeline step (its store processor, ``pred_x0``, ``sag_masking``
and guidance line) on the same converted weights, with CFG and without."""

from __future__ import annotations

import pytest
import torch

from lib_attn import settings as S
from tests.fakes.a1111_double import a1111_host
from tests.support.diffusers_ref import diffusers_sag_eps, to_diffusers_unet
from tests.support.helpers import SCRIPT, assert_no_leftovers
from tests.support.pag import record_plain_run

BASE = dict(prompt="a red cube", negative_prompt="blurry", seed=11, steps=3, width=128, height=128)


def sag_args(**kw):
    return S.defaults().with_values({"sag_enabled": True, **{f"sag_{k}": v for k, v in kw.items()}}).to_args()


@pytest.mark.parametrize(("dtype", "steps", "tol"), [(torch.float32, 1, 1e-4), (torch.float64, 3, 1e-5)])
@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_sag_matches_diffusers_sag(dtype, steps, tol, cfg):
    """fp32: one step compared as the guided noise prediction within 1e-4; fp64: a 3-step Euler run compared on the
    latents within 1e-5 (as PAG's cross-check).  diffusers fixes the blur sigma and the mask threshold at 1.0, the
    defaults here."""
    import k_diffusion.external
    import k_diffusion.sampling

    base = dict(BASE, steps=steps, cfg_scale=cfg)
    with a1111_host("sd1", dtype=dtype) as h:
        h.load_script(SCRIPT)
        plain, seen = record_plain_run(h, **base)
        out = h.txt2img(**base, sampler_name="Euler", script_args=sag_args(scale=0.75)).samples
        assert_no_leftovers(h)
        model = h.modules.shared.sd_model
        dunet = to_diffusers_unet(model.model.diffusion_model)
        den = k_diffusion.external.CompVisDenoiser(model)

        def f(x, sigma):
            c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
            t = den.sigma_to_t(sigma)
            x_in = x * c_in[:, None, None, None]
            eps = diffusers_sag_eps(dunet, x_in, t, sigma, seen["cond"], seen["uncond"], cfg, 0.75)
            return x - sigma[:, None, None, None] * eps

        with torch.no_grad():
            ref = k_diffusion.sampling.sample_euler(f, seen["x0"], torch.tensor([*seen["sigmas"], 0.0]), disable=True)
    if steps == 1:
        sigma0 = seen["sigmas"][0]
        out, ref = (seen["x0"] - out) / sigma0, (seen["x0"] - ref) / sigma0
        plain_eps = (seen["x0"] - plain.samples) / sigma0
        assert (out - plain_eps).abs().max() > 1e-3  # SAG acted
    assert (out - ref).abs().max() < tol


def test_sag_on_ddim_matches_diffusers_sag_pipeline_loop():
    """A1111's DDIM (a timestep sampler: the model output is eps, the guidance goes in as an eps change) against a
    DDIM loop over diffusers' SAG step at the same timesteps, fp64, on the latents."""
    base = dict(BASE, steps=4, cfg_scale=5.0)
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        plain, seen = record_plain_run(h, **base)  # records the timesteps as "sigmas" and the start latent
        kw = dict(base, sampler_name="DDIM")
        plain = h.txt2img(**kw).samples
        out = h.txt2img(**kw, script_args=sag_args(scale=0.75)).samples
        model = h.modules.shared.sd_model
        dunet = to_diffusers_unet(model.model.diffusion_model)
        ac = model.alphas_cumprod.to(torch.float64)
        from modules.sd_samplers_timesteps import CompVisSampler

        ts = CompVisSampler.timesteps(base["steps"])
        seen_ddim = {}

        def record(params):
            seen_ddim.setdefault("x", params.x[-1:].clone())

        h.modules.script_callbacks.on_cfg_denoiser(record)
        try:
            h.txt2img(**kw)
        finally:
            h.modules.script_callbacks.remove_callbacks_for_function(record)
        x = seen_ddim["x"]
        with torch.no_grad():
            for index in range(len(ts) - 1, 0, -1):
                a_t, a_prev = ac[ts[index]], ac[ts[index - 1]]
                t = torch.tensor([float(ts[index])], dtype=torch.float64)
                sigma = ((1 - a_t) / a_t).sqrt().view(1)
                eps = diffusers_sag_eps(dunet, x, t, sigma, seen["cond"], seen["uncond"], 5.0, 0.75)
                x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    assert (out - plain).abs().max() > 1e-3
    assert (out - x).abs().max() < 1e-5
