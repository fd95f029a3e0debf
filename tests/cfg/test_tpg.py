"""TPG: the permutation is a reproducible shuffle of the tokens; end to end on the A1111 double against an
independent loop (separate uncond, cond and shuffled-cond calls, the chosen transformer blocks' ``forward`` swapped for
one that shuffles its input first), and Forge against A1111."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lib_attn import settings as S
from lib_attn.methods.tpg.core import permutation, shuffle_tokens
from tests.fakes.a1111_double import a1111_host
from tests.fakes.forge_env import forge_host
from tests.support.helpers import SCRIPT, assert_no_leftovers
from tests.support.pag import BASE, record_plain_run, reference_guided

SQUARE = dict(BASE, width=128, height=128)


def tpg_args(**kw):
    return S.defaults().with_values({"tpg_enabled": True, **{f"tpg_{k}": v for k, v in kw.items()}}).to_args()


def test_permutation_is_a_reproducible_shuffle():
    p = permutation(11, 3, 64)
    assert sorted(p.tolist()) == list(range(64)) and not torch.equal(p, torch.arange(64))
    assert torch.equal(p, permutation(11, 3, 64))
    assert not torch.equal(p, permutation(11, 4, 64)) and not torch.equal(p, permutation(12, 3, 64))
    x = torch.arange(2 * 64 * 3.0).view(2, 64, 3)
    y = shuffle_tokens(x, p)
    assert torch.equal(y[:, 5], x[:, p[5]]) and torch.equal(y.sort(dim=1).values, x.sort(dim=1).values)


@contextlib.contextmanager
def shuffled_blocks(unet, paths, seed, call):
    """Each block's ``forward`` shuffles its input tokens first (by plain attribute swaps)."""
    blocks = [unet.get_submodule(p) for p in paths]

    def make(block):
        forward = type(block).forward

        def f(x, *a, **k):
            return forward(block, x[:, permutation(seed, call(), x.shape[1])], *a, **k)

        return f

    for b in blocks:
        b.forward = make(b)
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


@pytest.mark.parametrize("batch_cond_uncond", [True, False])
def test_tpg_equals_independent_computation(batch_cond_uncond):
    cfg, scale, seed = 5.0, 2.5, SQUARE["seed"]
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        h.modules.shared.opts.batch_cond_uncond = batch_cond_uncond
        plain, seen = record_plain_run(h, cfg_scale=cfg, width=128, height=128)
        out = h.txt2img(**dict(SQUARE, cfg_scale=cfg, sampler_name="Euler"), script_args=tpg_args(scale=scale))
        unet = h.modules.shared.sd_model.model.diffusion_model
        paths = [n for n, _ in unet.named_modules() if n.startswith(("input_blocks.7.1.", "input_blocks.8.1."))
                 and n.count(".") == 4 and ".transformer_blocks." in n]
        calls = {"n": -1}

        def next_call():
            return calls["n"]

        @contextlib.contextmanager
        def perturbation():
            with shuffled_blocks(unet, paths, seed, next_call):
                yield

        def counting_cond():
            calls["n"] += 1
            return contextlib.nullcontext()

        ref = reference_guided(h, seen, cfg, [(scale, perturbation)], cond_context=counting_cond)
        assert_no_leftovers(h)
    assert paths
    assert (out.samples - ref).abs().max() < 1e-5
    assert (out.samples - plain.samples).abs().max() > 1e-3
    assert "TPG scale: 2.5" in out.infotexts[0] and 'TPG layers: "input.7, input.8"' in out.infotexts[0]


def test_forge_matches_a1111():
    kw = dict(SQUARE, batch_size=2, sampler_name="Euler", cfg_scale=5.0)
    results = {}
    for name, make in (("a1111", a1111_host), ("forge", forge_host)):
        with make("sd1") as h:
            h.load_script(SCRIPT)
            results[name] = (h.txt2img(**kw, script_args=tpg_args()).samples, h.txt2img(**kw).samples)
            assert h.callback_count() == 0
    (a, a_plain), (f, f_plain) = results["a1111"], results["forge"]
    delta_a, delta_f = a - a_plain, f - f_plain
    assert delta_f.abs().max() > 1e-2
    assert (delta_a - delta_f).abs().max() < 1e-3 * delta_a.abs().max()


def test_with_pag_at_cfg_1_and_hires_sdxl():
    kw = dict(BASE, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5, sampler_name="Euler",
              cfg_scale=1.0)
    args = S.defaults().with_values({"tpg_enabled": True, "tpg_layers": "input", "tpg_hires": "own",
                                     "tpg_hires_scale": 1.0, "pag_enabled": True}).to_args()
    for make in (a1111_host, forge_host):
        with make("sdxl") as h:
            h.load_script(SCRIPT)
            plain = h.txt2img(**kw).samples
            out = h.txt2img(**kw, script_args=args)
            assert h.callback_count() == 0
        assert torch.isfinite(out.samples).all() and (out.samples - plain).abs().max() > 1e-3
        assert "TPG hires scale: 1" in out.infotexts[0]
