"""PAG end to end on the A1111 double: real ldm UNet (tiny, random weights), real k-diffusion samplers.

The reference for "PAG on" is computed independently of the extension: three separate model calls per
step (uncond, cond, and cond with the selected self-attention modules' forward replaced by
``to_out(to_v(x))`` for the duration of that call), combined with the CFG+PAG formula and fed to the
same real k-diffusion sampler from the same start latent and sigmas, which are recorded from a plain run.
"""

from __future__ import annotations

import pytest
import torch

from lib_attn import settings as S
from tests.fakes.a1111_double import a1111_host
from tests.support.helpers import SCRIPT, assert_no_leftovers
from tests.support.pag import BASE, pag_args, record_plain_run, reference_sample


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
