"""``modules.script_loading``: a script file becomes a module named after its basename (``"x.py"``)."""

from __future__ import annotations

import importlib.util
import os

from modules import errors  # noqa: F401

loaded_scripts: dict = {}


def load_module(path):
    path = str(path)
    spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loaded_scripts[path] = module
    return module
