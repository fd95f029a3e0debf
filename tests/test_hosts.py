"""Which WebUI is running: the adapters' choice, and a clear refusal on a Forge build with neither backend, where
nothing is installed and "off" is untouched."""

from __future__ import annotations

import ast
import pathlib
import sys
import types

import pytest

from lib_attn import settings as S
from tests.fakes.a1111_double import a1111_host
from tests.support.helpers import ROOT, SCRIPT

BASE = {"prompt": "a red cube", "seed": 3, "steps": 2, "cfg_scale": 5.0, "width": 64, "height": 64}
CALC = "ldm_patched.modules.samplers:calc_cond_batch"


def _pretend(monkeypatch, present: set[str], version: str | None, host=None):
    host = host or sys.modules["lib_attn.host"]
    monkeypatch.setattr(host, "_exists", lambda name: name in present)
    monkeypatch.setattr(host, "_defines", lambda module, name: f"{module}:{name}" in present)
    if version is not None:
        pkg = types.ModuleType("modules_forge")
        mod = types.ModuleType("modules_forge.forge_version")
        mod.version = version
        pkg.forge_version = mod
        monkeypatch.setitem(sys.modules, "modules_forge", pkg)
        monkeypatch.setitem(sys.modules, "modules_forge.forge_version", mod)
    return host


LDM = {"ldm_patched", "ldm_patched.modules.samplers", "modules_forge"}


@pytest.mark.parametrize(
    ("present", "version", "kind", "name"),
    [
        (set(), None, "a1111", "AUTOMATIC1111"),
        ({"backend.patcher", "modules_forge"}, "2.0.1v1.10.1", "forge", "Forge 2.0.1v1.10.1"),
        ({"backend.patcher", "modules_forge"}, "neo", "forge", "Forge neo"),
        (LDM | {CALC}, "1.0.0v2-v1.10.1RC", "reforge", "reForge 1.0.0v2-v1.10.1RC"),
        (LDM, "classic", "classic", "Forge Classic"),
        (LDM, "0.0.17v1.8.0rc", "classic", "Forge 0.0.17v1.8.0rc (ldm_patched)"),
        ({"modules_forge"}, "9.9", "unsupported", "Forge 9.9"),
    ],
)
def test_detect(monkeypatch, present, version, kind, name):
    import lib_attn.host  # noqa: F401

    host = _pretend(monkeypatch, present, version)
    assert host.detect() == kind
    assert host.host_name() == name


def test_a_forge_build_with_neither_backend_gets_a_clear_message_and_off_is_untouched(monkeypatch):
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        status, plain = h.api_txt2img(BASE)
        assert status == 200
        host = _pretend(monkeypatch, {"modules_forge"}, "9.9", host=h.loaded_scripts[-1][1].host)  # the script's own
        args = [{"pag": {"scale": 3.0}}]
        status, resp = h.api_txt2img({**BASE, "alwayson_scripts": {S.TITLE: {"args": args}}})
        assert status == 500, (host.detect(), resp)
        assert "WebUI (host): Forge 9.9 has neither Forge 2's backend nor the ldm_patched one" in resp["errors"]
        assert host.cleanup_model() == 0
        status, off = h.api_txt2img({**BASE, "alwayson_scripts": {S.TITLE: {"args": [{}]}}})
        assert status == 200 and off["images"] == plain["images"]
        assert h.callback_count() == 0


@pytest.mark.parametrize("adapter", ["forge", "reforge", "classic"])
def test_each_forge_adapter_is_thin_and_imports_only_its_own_backend(adapter):
    """An adapter is a Backend (attention, batched call, CFG wiring) over forge_family.py: no method names, and the
    ``ldm_patched`` adapters never reach into Forge 2's ``backend`` package (nor Forge 2's into ``ldm_patched``)."""
    from lib_attn.methods import METHODS

    source = (ROOT / "lib_attn" / "host" / f"{adapter}.py").read_text()
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    host_packages = {m.split(".")[0] for m in imported} & {"backend", "ldm_patched", "modules"}
    assert host_packages == ({"backend"} if adapter == "forge" else {"ldm_patched"})
    assert len(source.splitlines()) < 100
    words = set(source.replace("_", " ").lower().split())
    assert not {m.name for m in METHODS} & words, "an adapter names a method"


def test_the_family_session_names_no_method():
    from lib_attn.methods import METHODS

    source = pathlib.Path(ROOT / "lib_attn" / "host" / "forge_family.py").read_text().lower()
    assert not [m.name for m in METHODS if f'"{m.name}"' in source or f"methods.{m.name}" in source]
