"""Pure guidance math and schedules."""

from __future__ import annotations

import torch

from lib_attn import guided, ops
from lib_attn.layers import LayerKey
from lib_attn.methods.pag import METHOD as PAG
from lib_attn.methods.pag import core as guidance
from lib_attn.methods.pag.core import PagPlan

PagSettings = PAG.settings_class


def test_cfg_pag_formula():
    g = torch.Generator().manual_seed(0)
    u, c, p = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    out = guidance.cfg_pag(u, c, p, 7.0, 3.0)
    assert torch.allclose(out, u + 7.0 * (c - u) + 3.0 * (c - p))
    assert torch.equal(guidance.cfg_pag(u, c, p, 7.0, 0.0), u + (c - u) * 7.0)
    assert torch.allclose(guidance.cfg_pag(None, c, p, 1.0, 2.0), c + 2.0 * (c - p))


def test_progress_and_interval():
    assert ops.progress(0, 20) == 0.0
    assert ops.progress(19, 20) == 1.0
    assert ops.progress(0, 1) == 0.0
    assert ops.progress(0, 1, single=1.0) == 1.0
    assert ops.in_interval(0.5, 0.5, 0.5)
    assert not ops.in_interval(0.51, 0.0, 0.5)


def test_adaptive_scale_matches_diffusers_definition():
    # diffusers: signal_scale = pag_scale - pag_adaptive_scale * (1000 - t), clipped at 0
    assert guided.adaptive_scale(3.0, 0.0, 10) == 3.0
    assert guided.adaptive_scale(3.0, 0.001, 999) == 3.0 - 0.001
    assert guided.adaptive_scale(3.0, 0.01, 0) == 0.0


def test_plan_scale_schedule():
    keys = [LayerKey("middle", 0, 0)]
    plan = PagPlan.build(PagSettings(enabled=True, scale=2.0, start=0.25, end=0.75), keys)
    scales = [plan.scale_at(i, 5, None) for i in range(5)]
    assert scales == [0.0, 2.0, 2.0, 2.0, 0.0]
    assert PagPlan.build(PagSettings(enabled=True, scale=0.0), keys) is None
    assert PagPlan.build(PagSettings(enabled=False, scale=3.0), keys) is None
    fading = PagPlan.build(PagSettings(enabled=True, scale=2.0, adaptive_scale=0.004), keys)
    assert fading.scale_at(0, 10, 999.0) > fading.scale_at(5, 10, 500.0) == 0.0
