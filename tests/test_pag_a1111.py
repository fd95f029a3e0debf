"""PAG end to end on the A1111 double: real ldm UNet (tiny, random weights), real k-diffusion samplers.

The reference for "PAG on" is computed independently of the extension: three separate model calls per
step (uncond, cond, and cond with the selected self-attention modules' forward replaced by
``to_out(to_v(x))`` for the duration of that call), combined with the CFG+PAG formula and fed to the
same real k-diffusion sampler from the same start latent and sigmas, which are recorded from a plain run.
"""

from __future__ import annotations

import contextlib
import pathlib

import pytest
import torch

from lib_attn import settings as S
from tests.fakes.a1111_double import a1111_host

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "attention_toolkit.py"
BASE = dict(prompt="a red cube", negative_prompt="blurry", seed=11, steps=4, cfg_scale=5.0, width=96, height=80)


def pag_args(**kw):
    values = {"pag_enabled": True, **{f"pag_{k}": v for k, v in kw.items()}}
    return S.defaults().with_values(values).to_args()


def attn1_modules(unet):
    return {n: m for n, m in unet.named_modules() if n.endswith("attn1")}


def assert_no_leftovers(h):
    unet = h.modules.shared.sd_model.model.diffusion_model
    for name, m in unet.named_modules():
        assert "forward" not in m.__dict__, f"patch left on {name}"
        assert not m._forward_pre_hooks and not m._forward_hooks, f"hook left on {name}"
    assert h.callback_count() == 0


@contextlib.contextmanager
def identity_on(modules):
    """Independent perturbation: plain attribute swap of forward, restored afterwards."""
    saved = []
    for m in modules:
        saved.append(m)
        m.forward = lambda x, context=None, mask=None, _m=m, **kw: _m.to_out(_m.to_v(x))
    try:
        yield
    finally:
        for m in saved:
            del m.forward


def record_plain_run(h, **kw):
    """Run without the extension, recording start latent, sigmas and conds seen by the denoiser."""
    seen = {"sigmas": [], "x0": None, "cond": None, "uncond": None}
    cb = h.modules.script_callbacks

    def on_denoiser(params):
        b = params.text_uncond.shape[0]
        if seen["x0"] is None:
            seen["x0"] = params.x[-b:].clone()
            seen["cond"], seen["uncond"] = params.text_cond, params.text_uncond
        seen["sigmas"].append(float(params.sigma[0]))

    cb.on_cfg_denoiser(on_denoiser)
    try:
        out = h.txt2img(**{**BASE, **kw}, sampler_name="Euler", script_args=S.defaults().to_args())
    finally:
        cb.remove_callbacks_for_function(on_denoiser)
    return out, seen


def reference_sample(h, seen, cfg, pag_scale, layers, *, model_fn=None):
    import k_diffusion.external
    import k_diffusion.sampling

    model = h.modules.shared.sd_model
    den = k_diffusion.external.CompVisDenoiser(model)
    unet = model.model.diffusion_model
    mods = [unet.get_submodule(p) for p in layers]

    def cond_dict(c):
        return {"c_crossattn": [c], "c_concat": [torch.zeros(c.shape[0], 5, 1, 1, dtype=c.dtype)]}

    def f(x, sigma):
        u = den(x, sigma, cond=cond_dict(seen["uncond"]))
        c = den(x, sigma, cond=cond_dict(seen["cond"]))
        with identity_on(mods):
            p = den(x, sigma, cond=cond_dict(seen["cond"]))
        return u + cfg * (c - u) + pag_scale * (c - p)

    sigmas = torch.tensor([*seen["sigmas"], 0.0])
    with torch.no_grad():
        return k_diffusion.sampling.sample_euler(model_fn or f, seen["x0"] * 1.0, sigmas, disable=True)


@pytest.fixture
def host():
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        yield h


def test_off_and_scale_zero_are_bit_identical_to_no_extension():
    with a1111_host("sd1") as h:
        plain = h.txt2img(**BASE, batch_size=2).samples
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        off = h.txt2img(**BASE, batch_size=2, script_args=S.defaults().to_args()).samples
        zero = h.txt2img(**BASE, batch_size=2, script_args=pag_args(scale=0.0)).samples
        named_off = h.txt2img(**BASE, batch_size=2, script_args=[{"pag": {"enabled": False}}]).samples
        assert_no_leftovers(h)
    assert torch.equal(plain, off)
    assert torch.equal(plain, zero)
    assert torch.equal(plain, named_off)


@pytest.mark.parametrize("batch_cond_uncond", [True, False])
def test_pag_equals_independent_computation(host, batch_cond_uncond):
    host.modules.shared.opts.batch_cond_uncond = batch_cond_uncond
    plain, seen = record_plain_run(host)
    ref0 = reference_sample(host, seen, 5.0, 0.0, [])
    assert torch.allclose(ref0, plain.samples, atol=1e-5), "reference harness must reproduce the plain run"

    out = host.txt2img(**BASE, sampler_name="Euler", script_args=pag_args(scale=3.0))
    ref = reference_sample(host, seen, 5.0, 3.0, ["middle_block.1.transformer_blocks.0.attn1"])
    assert (out.samples - ref).abs().max() < 1e-5
    assert (out.samples - plain.samples).abs().max() > 1e-3  # PAG changed the result
    assert out.infotexts[0].count("PAG scale: 3") == 1
    assert_no_leftovers(host)


def test_batched_rows_ride_in_one_call(host):
    """3B rows in one UNet call with batch_cond_uncond; identity only on the perturbed rows."""
    unet = host.modules.shared.sd_model.model.diffusion_model
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        host.txt2img(**BASE, batch_size=2, sampler_name="Euler", script_args=pag_args())
    finally:
        handle.remove()
    assert calls == [6] * BASE["steps"]


def test_layer_selector_selects_what_it_says(host):
    _, seen = record_plain_run(host)
    with pytest.raises(Exception, match=r"'output.1' matched no layer"):
        host.txt2img(**BASE, sampler_name="Euler", script_args=pag_args(layers="input.4, output.1"))
    layers = ["input_blocks.4.1.transformer_blocks.0.attn1", "output_blocks.4.1.transformer_blocks.0.attn1"]
    out = host.txt2img(**BASE, sampler_name="Euler", script_args=pag_args(layers="input.4, output.4"))
    ref = reference_sample(host, seen, 5.0, 3.0, layers)
    assert (out.samples - ref).abs().max() < 1e-5
    assert_no_leftovers(host)
