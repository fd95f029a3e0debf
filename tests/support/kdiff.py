"""Import the real PyPI ``k-diffusion`` samplers without its package ``__init__``.

``k_diffusion/__init__.py`` imports training and evaluation modules that need torchvision, CLIP and
scikit-image, none of which the samplers use.  :func:`load_k_diffusion` registers ``k_diffusion`` as a
bare package whose ``__path__`` is the installed directory, so ``import k_diffusion.sampling`` and
``import k_diffusion.external`` run the installed files unchanged.  ``k_diffusion/utils.py`` imports
``torchvision.transforms.functional`` at the top for image helpers the samplers never call; when
torchvision cannot be imported, a stub module stands in for that one import and is removed from
``sys.modules`` right after.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def _stub_torchvision() -> list[str]:
    """Install the stub when torchvision does not import; returns the module names to remove afterwards."""
    try:
        import torchvision.transforms.functional  # noqa: F401

        return []
    except Exception:  # missing, or a build that does not match torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    tv = types.ModuleType("torchvision")
    tv.__path__ = []  # a package, so submodules resolve
    transforms = types.ModuleType("torchvision.transforms")
    transforms.__path__ = []
    functional = types.ModuleType("torchvision.transforms.functional")

    def _unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is not installed in the test environment")

    functional.to_pil_image = functional.to_tensor = _unavailable
    tv.transforms = transforms
    transforms.functional = functional
    stubs = {
        "torchvision": tv,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    }
    sys.modules.update(stubs)
    return list(stubs)


def load_k_diffusion() -> types.ModuleType:
    """Make ``k_diffusion.sampling`` / ``k_diffusion.external`` importable; returns the package."""
    pkg = sys.modules.get("k_diffusion")
    if pkg is not None and hasattr(pkg, "__path__"):
        return pkg
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (bash tests/run.sh installs it with --no-deps)")
    stubs = _stub_torchvision()
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    pkg.__package__ = "k_diffusion"
    pkg.__spec__ = spec  # importlib.util.find_spec("k_diffusion") (diffusers asks) must keep working
    sys.modules["k_diffusion"] = pkg
    try:
        importlib.import_module("k_diffusion.utils")  # the one module that imports torchvision
    finally:
        for name in stubs:  # the stub lives only inside k_diffusion.utils; nobody else sees a fake torchvision
            sys.modules.pop(name, None)
    return pkg
