"""Run by the WebUI once per start (a separate process, WebUI root on PYTHONPATH).

PAG needs nothing beyond what A1111 and Forge already ship (torch, gradio).  The table below
lists what later methods need; each entry is checked first and installed only when missing or
too old, in one pip call, and nothing happens under ``--skip-install``.
"""

from __future__ import annotations

import importlib.metadata

# distribution name -> minimum version (None: any)
REQUIREMENTS: dict[str, str | None] = {}


def _missing() -> list[str]:
    from packaging.version import Version

    out = []
    for dist, minimum in REQUIREMENTS.items():
        try:
            have = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist}>={minimum}" if minimum else dist)
            continue
        if minimum and Version(have) < Version(minimum):
            out.append(f"{dist}>={minimum}")
    return out


def main() -> None:
    try:
        import launch
    except ImportError:  # not run by the WebUI
        return
    if getattr(getattr(launch, "args", None), "skip_install", False):
        return
    missing = _missing()
    if missing:
        launch.run_pip("install " + " ".join(f'"{m}"' for m in missing), "requirements for Attention Toolkit")


main()
