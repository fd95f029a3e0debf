"""Only lib_attn.host imports the WebUI; only lib_attn.ui imports gradio; scripts/ holds one file."""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOST_ROOTS = {"modules", "backend", "ldm_patched", "launch", "modules_forge"}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_host_imports_only_in_host_package():
    offenders = []
    for path in (ROOT / "lib_attn").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        imported = _imports(path)
        if not rel.startswith("lib_attn/host/") and imported & HOST_ROOTS:
            offenders.append((rel, sorted(imported & HOST_ROOTS)))
        if rel != "lib_attn/ui.py" and "gradio" in imported:
            offenders.append((rel, ["gradio"]))
    assert offenders == []


def test_scripts_folder_holds_only_the_script():
    files = sorted(p.name for p in (ROOT / "scripts").iterdir() if p.suffix == ".py")
    assert files == ["attention_toolkit.py"]


def test_importing_core_pulls_no_host(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, lib_attn, lib_attn.settings, lib_attn.layers, lib_attn.batch, lib_attn.registry, "
        "lib_attn.ops, lib_attn.session, lib_attn.methods, lib_attn.methods.pag.core, lib_attn.host\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in {'modules','backend','ldm_patched','gradio','launch'}]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


METHOD_WORDS = re.compile(
    r"\b(pag|coloriz\w*|colour\w*|style\w*|edit.?mask\w*|inpaint\w*|yoda|dino\w*|masked.upscal\w*|perturb\w*)\b", re.I
)
def test_host_adapters_name_no_method():
    offenders = []
    for path in sorted((ROOT / "lib_attn" / "host").glob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if METHOD_WORDS.search(line):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert offenders == []


def test_every_method_has_forge_hooks_and_a_folder():
    from lib_attn.methods import METHODS

    for m in METHODS:
        folder = ROOT / "lib_attn" / "methods" / m.name
        assert (folder / "__init__.py").exists() and (folder / "core.py").exists(), m.name
        per_host = (folder / "hooks_forge.py").exists() and (folder / "hooks_a1111.py").exists()
        assert per_host or (folder / "hooks.py").exists(), m.name  # hooks.py: the same on every host (CfgHooks)


def test_host_files_stay_small():
    for path in (ROOT / "lib_attn" / "host").glob("*.py"):
        assert len(path.read_text().splitlines()) < 400, path.name
