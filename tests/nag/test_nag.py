"""NAG: the formula against the paper / ComfyUI-NAG's ``nag`` (rewritten here from a reading: per-token L1 norms),
and end to end on both doubles against a computation apart from the extension: separate model calls per step, the
cond call with every cross-attention ``forward`` swapped for explicit per-head attention on the prompt and on the
negative prompt, combined by that formula."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lib_attn import settings as S
from lib_attn.methods.nag.core import nag
from tests.fakes.a1111_double import a1111_host
from tests.fakes.forge_env import forge_host
from tests.support.helpers import SCRIPT, assert_no_leftovers
from tests.support.pag import BASE, record_plain_run, reference_guided

SQUARE = dict(BASE, width=128, height=128)


def nag_args(**kw):
    values = {"nag_enabled": True}
    for k, v in kw.items():
        values[k if k.startswith(("pag_", "sag_", "nag_")) else f"nag_{k}"] = v
    return S.defaults().with_values(values).to_args()


def paper_nag(zp, zn, s, tau, alpha):
    zg = s * zp - (s - 1) * zn
    r = zg.abs().sum(-1, keepdim=True).clamp_min(1e-6) / zp.abs().sum(-1, keepdim=True).clamp_min(1e-6)
    zg = torch.where(r > tau, zg * tau / r, zg)
    return alpha * zg + (1 - alpha) * zp


@pytest.mark.parametrize(("s", "tau", "alpha"), [(5.0, 2.5, 0.25), (2.0, 1.0, 1.0), (11.0, 10.0, 0.5), (1.0, 2.5, 0.5)])
def test_formula_matches_the_paper(s, tau, alpha):
    g = torch.Generator().manual_seed(3)
    zp, zn = torch.randn(2, 9, 16, generator=g, dtype=torch.float64), torch.randn(2, 9, 16, generator=g, dtype=torch.float64)
    assert torch.allclose(nag(zp, zn, s, tau, alpha), paper_nag(zp, zn, s, tau, alpha), atol=1e-12)
    if s == 1.0:
        assert torch.allclose(nag(zp, zn, s, tau, alpha), zp)


def explicit_attention(q, k, v, heads):
    d = q.shape[-1] // heads
    outs = []
    for i in range(heads):
        s = slice(i * d, (i + 1) * d)
        outs.append(torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) * d**-0.5, dim=-1) @ v[..., s])
    return torch.cat(outs, -1)


@contextlib.contextmanager
def nag_on(unet, negative, s, tau, alpha):
    mods = [m for n, m in unet.named_modules() if n.endswith("attn2")]

    def make(m):
        def forward(x, context=None, mask=None, **kw):
            q = m.to_q(x)
            zp = explicit_attention(q, m.to_k(context), m.to_v(context), m.heads)
            zn = explicit_attention(q, m.to_k(negative), m.to_v(negative), m.heads)
            return m.to_out(paper_nag(zp, zn, s, tau, alpha))

        return forward

    for m in mods:
        m.forward = make(m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def reference(h, seen, cfg, s, tau, alpha):
    """Separate uncond and cond calls, the cond one with NAG put on the model by plain attribute swaps."""
    unet = h.modules.shared.sd_model.model.diffusion_model
    return reference_guided(h, seen, cfg, [], cond_context=lambda: nag_on(unet, seen["uncond"], s, tau, alpha))


@pytest.mark.parametrize("make", [a1111_host, forge_host])
def test_off_and_scale_one_are_bit_identical(make):
    with make("sd1") as h:
        plain = h.txt2img(**BASE, batch_size=2).samples
    with make("sd1") as h:
        h.load_script(SCRIPT)
        off = h.txt2img(**BASE, batch_size=2, script_args=S.defaults().to_args()).samples
        one = h.txt2img(**BASE, batch_size=2, script_args=nag_args(scale=1.0)).samples
        assert h.callback_count() == 0
    assert torch.equal(plain, off)
    assert torch.equal(plain, one)


@pytest.mark.parametrize("cfg", [5.0, 1.0])
@pytest.mark.parametrize("batch_cond_uncond", [True, False])
def test_nag_equals_independent_computation(cfg, batch_cond_uncond):
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        h.modules.shared.opts.batch_cond_uncond = batch_cond_uncond
        plain, seen = record_plain_run(h, cfg_scale=cfg)
        kw = dict(BASE, cfg_scale=cfg, sampler_name="Euler")
        out = h.txt2img(**kw, script_args=nag_args(scale=4.0, tau=2.0, alpha=0.5))
        ref = reference(h, seen, cfg, 4.0, 2.0, 0.5)
        assert_no_leftovers(h)
    assert (out.samples - ref).abs().max() < 1e-5
    assert (out.samples - plain.samples).abs().max() > 1e-3
    assert "NAG scale: 4" in out.infotexts[0] and "NAG tau: 2" in out.infotexts[0]


@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_forge_matches_a1111_path(cfg):
    """At CFG 1 Forge makes no negative conditioning; the hook makes it as the host would."""
    kw = dict(SQUARE, batch_size=2, sampler_name="Euler", cfg_scale=cfg, negative_prompt="blurry, dark")
    results = {}
    for name, make in (("a1111", a1111_host), ("forge", forge_host)):
        with make("sd1") as h:
            h.load_script(SCRIPT)
            results[name] = (h.txt2img(**kw, script_args=nag_args()).samples, h.txt2img(**kw).samples)
            assert h.callback_count() == 0
            if name == "forge" and cfg == 1.0:
                assert all(c["cond_or_uncond"] == [0] for c in h.unet_calls)  # no uncond rows were run
    (a, a_plain), (f, f_plain) = results["a1111"], results["forge"]
    assert (a_plain - f_plain).abs().max() < 1e-4 * a_plain.abs().max()
    delta_a, delta_f = a - a_plain, f - f_plain
    assert delta_f.abs().max() > 1e-2
    assert (delta_a - delta_f).abs().max() < 1e-3 * delta_a.abs().max()


def test_negative_prompt_matters_at_cfg_1():
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        kw = dict(BASE, cfg_scale=1.0, sampler_name="Euler")
        one, other = dict(kw, negative_prompt="blurry"), dict(kw, negative_prompt="sharp, bright")
        a = h.txt2img(**one, script_args=nag_args()).samples
        b = h.txt2img(**other, script_args=nag_args()).samples
        plain_a, plain_b = h.txt2img(**one).samples, h.txt2img(**other).samples
    assert torch.equal(plain_a, plain_b)  # without NAG, Forge ignores the negative prompt at CFG 1
    assert (a - b).abs().max() > 1e-3


def test_with_pag_sag_and_hires_sdxl():
    args = nag_args(pag_enabled=True, pag_scale=1.0, sag_enabled=True, hires="own", hires_scale=3.0)
    kw = dict(BASE, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5, sampler_name="Euler")
    for make in (a1111_host, forge_host):
        with make("sdxl") as h:
            h.load_script(SCRIPT)
            plain = h.txt2img(**kw).samples
            out = h.txt2img(**kw, script_args=args)
            assert h.callback_count() == 0
        assert torch.isfinite(out.samples).all() and (out.samples - plain).abs().max() > 1e-3
        assert "NAG hires scale: 3" in out.infotexts[0]
