"""SEG end to end on both doubles (real ldm UNet, real k-diffusion samplers).

The reference is computed apart from the extension: separate model calls per step, and for the perturbed call the
chosen self-attention modules' ``forward`` swapped for explicit per-head attention whose queries were blurred with
the official code's 2-D kernel (``tests/seg/test_seg_core.official_query``)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lib_attn import settings as S
from tests.fakes.a1111_double import a1111_host
from tests.fakes.forge_env import forge_host
from tests.seg.test_seg_core import official_blur
from tests.support.helpers import SCRIPT, assert_no_leftovers
from tests.support.pag import BASE, identity_on, record_plain_run, reference_guided

MIDDLE = "middle_block.1.transformer_blocks.0.attn1"
SQUARE = dict(BASE, width=128, height=128)  # latent 16x16: grids 16, 8, 4, 2


def args(**kw):
    values = {"seg_enabled": True}
    for k, v in kw.items():
        values[k if k.startswith(("pag_", "seg_")) else f"seg_{k}"] = v
    return S.defaults().with_values(values).to_args()


def explicit_seg_forward(m, sigma, latent_hw):
    def forward(x, context=None, mask=None, **kw):
        b, n, c = x.shape
        h, w = latent_hw
        while h * w != n:
            h, w = (h + 1) // 2, (w + 1) // 2
        q, k, v = m.to_q(x), m.to_k(x), m.to_v(x)
        maps = q.transpose(1, 2).reshape(b, c, h, w)
        maps = maps.mean(dim=(-2, -1), keepdim=True).expand_as(maps) if sigma > 9999 else official_blur(maps, sigma)
        q = maps.reshape(b, c, n).transpose(1, 2)
        d = c // m.heads
        outs = []
        for i in range(m.heads):
            s = slice(i * d, (i + 1) * d)
            attn = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) * d**-0.5, dim=-1)
            outs.append(attn @ v[..., s])
        return m.to_out(torch.cat(outs, -1))

    return forward


@contextlib.contextmanager
def blurred(modules, sigma, latent_hw):
    for m in modules:
        m.forward = explicit_seg_forward(m, sigma, latent_hw)
    try:
        yield
    finally:
        for m in modules:
            del m.forward


@pytest.fixture
def host():
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        yield h


def test_off_and_scale_zero_are_bit_identical():
    with a1111_host("sd1") as h:
        plain = h.txt2img(**BASE, batch_size=2).samples
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        off = h.txt2img(**BASE, batch_size=2, script_args=S.defaults().to_args()).samples
        zero = h.txt2img(**BASE, batch_size=2, script_args=args(scale=0.0)).samples
        assert_no_leftovers(h)
    assert torch.equal(plain, off)
    assert torch.equal(plain, zero)


@pytest.mark.parametrize(
    ("base", "layers", "sigma", "paths"),
    [
        (BASE, "middle", 10000.0, [MIDDLE]),  # the default: infinite blur
        (SQUARE, "input.1, output.11", 1.0, ["input_blocks.1.1.transformer_blocks.0.attn1",
                                              "output_blocks.11.1.transformer_blocks.0.attn1"]),
        (SQUARE, "input.4", 2.0, ["input_blocks.4.1.transformer_blocks.0.attn1"]),
    ],
)
@pytest.mark.parametrize("batch_cond_uncond", [True, False])
def test_seg_equals_independent_computation(host, base, layers, sigma, paths, batch_cond_uncond):
    host.modules.shared.opts.batch_cond_uncond = batch_cond_uncond
    plain, seen = record_plain_run(host, **base)
    mods = [host.modules.shared.sd_model.model.diffusion_model.get_submodule(p) for p in paths]
    latent = (base["height"] // 8, base["width"] // 8)
    out = host.txt2img(**base, sampler_name="Euler", script_args=args(scale=2.5, layers=layers, blur_sigma=sigma))
    ref = reference_guided(host, seen, 5.0, [(2.5, lambda: blurred(mods, sigma, latent))])
    assert (out.samples - ref).abs().max() < 1e-5
    assert (out.samples - plain.samples).abs().max() > 1e-3
    assert "SEG scale: 2.5" in out.infotexts[0] and f"SEG blur sigma: {sigma:g}" in out.infotexts[0]
    assert_no_leftovers(host)


def test_pag_and_seg_each_have_their_own_rows(host):
    """Both on: two perturbed row sets (4B rows per call), two guidance terms, as separate calls would give."""
    _plain, seen = record_plain_run(host)
    unet = host.modules.shared.sd_model.model.diffusion_model
    mid = [unet.get_submodule(MIDDLE)]
    rows = []
    handle = unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        out = host.txt2img(**BASE, sampler_name="Euler", script_args=args(
            scale=2.0, pag_enabled=True, pag_scale=1.5))
    finally:
        handle.remove()
    assert rows == [4] * BASE["steps"]
    ref = reference_guided(host, seen, 5.0, [(1.5, lambda: identity_on(mid)),
                                             (2.0, lambda: blurred(mid, 1e5, (10, 12)))])
    assert (out.samples - ref).abs().max() < 1e-5
    assert_no_leftovers(host)


def test_interval_and_hires_override(host):
    kw = dict(BASE, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5)
    plain = host.txt2img(**kw, script_args=args(hires="off", start=1.0, end=1.0, scale=0.5))
    first_only = host.txt2img(**kw, script_args=args(hires="off"))
    own = host.txt2img(**kw, script_args=args(hires="own", hires_scale=1.0))
    nothing = host.txt2img(**kw, script_args=args(hires="own", hires_scale=0.0, scale=0.0))
    assert (plain.samples - first_only.samples).abs().max() > 1e-4
    assert (own.samples - first_only.samples).abs().max() > 1e-4
    assert "SEG hires: own" in own.infotexts[0]
    with a1111_host("sd1", dtype=torch.float64) as h:
        assert torch.equal(h.txt2img(**kw).samples, nothing.samples)


def test_forge_matches_a1111_path():
    # a latent of multiples of 8: at other sizes the two UNets meet their skip connections differently
    kw = dict(SQUARE, batch_size=2, sampler_name="Euler")
    results = {}
    for name, make in (("a1111", a1111_host), ("forge", forge_host)):
        with make("sd1") as h:
            h.load_script(SCRIPT)
            results[name] = (h.txt2img(**kw, script_args=args(scale=2.0, blur_sigma=1.5, layers="middle, input.4"))
                             .samples, h.txt2img(**kw).samples)
            assert h.callback_count() == 0
    (a, a_plain), (f, f_plain) = results["a1111"], results["forge"]
    assert (a_plain - f_plain).abs().max() < 1e-4 * a_plain.abs().max()
    delta_a, delta_f = a - a_plain, f - f_plain
    assert delta_f.abs().max() > 1e-2
    assert (delta_a - delta_f).abs().max() < 1e-3 * delta_a.abs().max()


def test_forge_seg_at_cfg_1_and_off():
    kw = dict(BASE, cfg_scale=1.0)
    with forge_host("sd1") as h:
        plain = h.txt2img(**kw).samples
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        off = h.txt2img(**kw, script_args=S.defaults().to_args()).samples
        before = len(h.unet_calls)
        on = h.txt2img(**kw, script_args=args()).samples
        calls = [c["cond_or_uncond"] for c in h.unet_calls[before:]]
        assert h.callback_count() == 0
    assert torch.equal(plain, off)
    assert (on - plain).abs().max() > 1e-3  # SEG guides without CFG
    assert calls == [[0]] * (2 * kw["steps"])  # Forge skips the uncond rows; SEG adds one cond call per step
