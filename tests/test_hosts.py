"""Which WebUI is running: the adapters' choice, and a clear refusal on the Forge lines the toolkit does not run on
(the old ``ldm_patched`` backend: reForge, Forge Classic), where nothing is installed and "off" is untouched."""

from __future__ import annotations

import sys
import types

import pytest

from lib_attn import settings as S
from tests.fakes.a1111_double import a1111_host
from tests.support.helpers import SCRIPT

BASE = {"prompt": "a red cube", "seed": 3, "steps": 2, "cfg_scale": 5.0, "width": 64, "height": 64}


def _pretend(monkeypatch, present: set[str], version: str | None, host=None):
    host = host or sys.modules["lib_attn.host"]
    monkeypatch.setattr(host, "_exists", lambda name: name in present)
    if version is not None:
        pkg = types.ModuleType("modules_forge")
        mod = types.ModuleType("modules_forge.forge_version")
        mod.version = version
        pkg.forge_version = mod
        monkeypatch.setitem(sys.modules, "modules_forge", pkg)
        monkeypatch.setitem(sys.modules, "modules_forge.forge_version", mod)
    return host


@pytest.mark.parametrize(
    ("present", "version", "kind", "name"),
    [
        (set(), None, "a1111", "AUTOMATIC1111"),
        ({"backend.patcher", "modules_forge"}, "2.0.1v1.10.1", "forge", "Forge 2.0.1v1.10.1"),
        ({"backend.patcher", "modules_forge"}, "neo", "forge", "Forge neo"),
        ({"ldm_patched", "ldm_patched.modules.patcher_extension", "modules_forge"}, "1.0.0v2-v1.10.1RC",
         "unsupported", "reForge 1.0.0v2-v1.10.1RC"),
        ({"ldm_patched", "modules_forge"}, "classic", "unsupported", "Forge Classic"),
        ({"ldm_patched", "modules_forge"}, "0.0.17v1.8.0rc", "unsupported", "Forge on the ldm_patched backend"),
    ],
)
def test_detect(monkeypatch, present, version, kind, name):
    import lib_attn.host  # noqa: F401

    host = _pretend(monkeypatch, present, version)
    assert host.detect() == kind
    assert host.host_name().startswith(name)


def test_a_fork_on_the_old_backend_gets_a_clear_message_and_off_is_untouched(monkeypatch):
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        status, plain = h.api_txt2img(BASE)
        assert status == 200
        host = _pretend(monkeypatch, {"ldm_patched", "ldm_patched.modules.patcher_extension", "modules_forge"},
                        "1.0.0v2-v1.10.1RC", host=h.loaded_scripts[-1][1].host)  # the script's own
        args = [{"pag": {"scale": 3.0}}]
        status, resp = h.api_txt2img({**BASE, "alwayson_scripts": {S.TITLE: {"args": args}}})
        assert status == 500, (host.detect(), resp)
        assert "WebUI (host): reForge 1.0.0v2-v1.10.1RC (the ldm_patched backend) is not supported yet" in resp["errors"]
        assert host.cleanup_model() == 0
        status, off = h.api_txt2img({**BASE, "alwayson_scripts": {S.TITLE: {"args": [{}]}}})
        assert status == 200 and off["images"] == plain["images"]
        assert h.callback_count() == 0
