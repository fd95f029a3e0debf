"""Helpers shared by the end-to-end tests on both doubles: the extension's script file and the clean-up check."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "attention_toolkit.py"


def assert_no_leftovers(h):
    """No forward patch or hook on any UNet module of the loaded model, and no CFG callback left registered (the
    hooks of the WebUI's own ``--medvram``/``--lowvram`` stay: they are there from the model's load)."""
    unet = h.modules.shared.sd_model.model.diffusion_model
    for name, m in unet.named_modules():
        assert "forward" not in m.__dict__, f"patch left on {name}"
        pre = [f for f in m._forward_pre_hooks.values() if getattr(f, "__module__", None) != "modules.lowvram"]
        assert not pre and not m._forward_hooks, f"hook left on {name}"
    assert h.callback_count() == 0


def non_default_settings():
    """Settings with every field off its default and every section on (one value per field that a control can
    hold); the image fields hold a small picture."""
    from lib_attn import settings as S

    values = {}
    for f in S.FIELDS:
        if f.kind == "bool":
            values[f.key] = not f.default if f.name != "enabled" else True
        elif f.kind == "float":
            step = f.step or 1.0
            v = f.default + step if f.maximum is None or f.default + step <= f.maximum else f.default - step
            values[f.key] = round(v, 6)  # a value a slider gives (0.1 + 0.005 is not the float 0.105)
        elif f.kind == "int":
            step = int(f.step or 1)
            values[f.key] = f.default + step if f.default + step <= f.maximum else f.default - step
        elif f.kind == "choice":
            values[f.key] = next(c for c in f.choices if c != f.default)
        elif f.kind == "str":
            values[f.key] = "7, 3" if f.key == "fdg_scales" else "input.4, output.1"
        elif f.kind == "image":
            from PIL import Image

            values[f.key] = Image.new("RGB", (16, 16), (10, 200, 30))
    for section in S.SECTIONS:
        if f"{section}_start" in values:
            values[f"{section}_start"], values[f"{section}_end"] = 0.2, 0.8
    return S.defaults().with_values(values)
