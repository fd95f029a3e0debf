"""Helpers shared by the end-to-end tests on both doubles: the extension's script file and the clean-up check."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "attention_toolkit.py"


def assert_no_leftovers(h):
    """No forward patch or hook on any UNet module of the loaded model, and no CFG callback left registered."""
    unet = h.modules.shared.sd_model.model.diffusion_model
    for name, m in unet.named_modules():
        assert "forward" not in m.__dict__, f"patch left on {name}"
        assert not m._forward_pre_hooks and not m._forward_hooks, f"hook left on {name}"
    assert h.callback_count() == 0
