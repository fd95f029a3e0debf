"""``forge_host()``: run the Forge 2.x test double (``tests/fakes/forge``) inside a pytest process.

    with forge_host("sd1") as h:            # "sd1" | "sd2" | "sdxl" | "flux"
        h.load_script(ROOT / "scripts" / "attention_toolkit.py")
        out = h.txt2img(prompt="a cube", steps=4, width=64, height=64, script_args=[...])
        out.samples, out.images, out.infotexts, h.unet_calls, h.errors, h.callback_count()

``ForgeHost`` and the A1111 double's ``A1111Host`` share one API, ``tests.support.harness.Harness``.

On entry the double's directory goes first on ``sys.path`` and every previously imported ``modules*``,
``backend*``, ``modules_forge*``, ``scripts*`` and ``lib_attn.host*`` module is set aside (an A1111 double
may be loaded in the same process); on exit the double's modules are dropped and the previous ones and
``sys.path`` are restored.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import pathlib
import sys
import types
from typing import Any

import torch

from tests.support.harness import HarnessBase

FORGE_ROOT = pathlib.Path(__file__).resolve().parent / "forge"
FORKS_ROOT = pathlib.Path(__file__).resolve().parent / "forks"
HOST_PREFIXES = ("modules", "backend", "modules_forge", "ldm_patched", "scripts", "lib_attn.host")
FLAVOURS = {"forge2": "2.0.1v1.10.1", "reforge": "1.0.0v2-v1.10.1RC", "classic": "classic"}
"""The WebUIs on Forge's patcher that the double stands for, with their ``modules_forge.forge_version.version``."""
CHECKPOINTS = {
    "sd1": "tiny-sd1.safetensors",
    "sd2": "tiny-sd2.safetensors",
    "sdxl": "tiny-sdxl.safetensors",
    "flux": "tiny-flux.safetensors",
}


def _is_host_module(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in HOST_PREFIXES)


def _detach(names: list[str]) -> dict[str, Any]:
    """Remove modules from sys.modules and from their parent package's attributes."""
    removed = {}
    for name in names:
        mod = sys.modules.pop(name, None)
        if mod is None:
            continue
        removed[name] = mod
        parent, _, child = name.rpartition(".")
        if parent and parent in sys.modules and getattr(sys.modules[parent], child, None) is mod:
            delattr(sys.modules[parent], child)
    return removed


def _attach(modules: dict[str, Any]) -> None:
    for name, mod in sorted(modules.items()):
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent and parent in sys.modules:
            setattr(sys.modules[parent], child, mod)


def _load_k_diffusion() -> None:
    try:
        from tests.support.kdiff import load_k_diffusion
    except ImportError:  # support module not available: import the sampling modules without k_diffusion/__init__
        if "k_diffusion.sampling" in sys.modules:
            return
        if importlib.util.find_spec("torchvision") is None:  # k_diffusion.utils imports it at module level
            tv = types.ModuleType("torchvision")
            tv.__path__ = []
            tv.transforms = types.ModuleType("torchvision.transforms")
            tv.transforms.__path__ = []
            tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
            for name, mod in (
                ("torchvision", tv),
                ("torchvision.transforms", tv.transforms),
                ("torchvision.transforms.functional", tv.transforms.functional),
            ):
                sys.modules.setdefault(name, mod)
        spec = importlib.util.find_spec("k_diffusion")
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = pkg
        for sub in ("utils", "sampling", "external"):
            setattr(pkg, sub, importlib.import_module(f"k_diffusion.{sub}"))
        return
    load_k_diffusion()


class _Namespace:
    def __init__(self, package: str):
        self._package = package

    def __getattr__(self, name: str):
        return importlib.import_module(f"{self._package}.{name}")


class ForgeHost(HarnessBase):
    """Handle yielded by ``forge_host``; its common API with ``A1111Host`` is ``tests.support.harness.Harness``."""

    def __init__(self, kind: str):
        self.kind = kind
        self.modules = _Namespace("modules")
        self.backend = _Namespace("backend")
        self.loaded_scripts: list = []  # (path, module)
        self.unet_calls: list[dict] = []
        self.last_p = None
        self._baseline: set[int] = set()
        self._baseline_refs: list = []  # keeps the ids in _baseline from being reused
        self._api = None
        k_model = importlib.import_module("backend.modules.k_model")
        k_model.apply_model_listeners.append(self._record_call)

    # ---- observation --------------------------------------------------------------------------
    def _record_call(self, x, sigma, transformer_options):
        self.unet_calls.append(
            {
                "rows": int(x.shape[0]),
                "shape": tuple(x.shape),
                "cond_or_uncond": list(transformer_options.get("cond_or_uncond", [])),
                "sigma": float(sigma[0]),
                "inference_mode": torch.is_inference_mode_enabled(),
            }
        )

    # ---- scripts ------------------------------------------------------------------------------
    def load_script(self, path) -> types.ModuleType:
        """Load a script file like the WebUI (module name = basename) and rebuild both script runners;
        each AlwaysOn script gets ``args_from``/``args_to`` from a ``ui()`` call made inside ``gr.Blocks()``."""
        import gradio as gr

        scripts = self.modules.scripts
        module = scripts.load_script_file(path)
        if module is None:
            raise RuntimeError(f"script failed to load: {path} ({self.errors[-1][0] if self.errors else ''})")
        self.loaded_scripts.append((str(path), module))
        for runner, is_img2img in ((scripts.scripts_txt2img, False), (scripts.scripts_img2img, True)):
            runner.initialize_scripts(is_img2img)
            runner.prepare_ui()
            with gr.Blocks():
                runner.setup_ui()
        self._api = None
        self._snapshot_callbacks()
        return module

    def start(self, extension_scripts, *, nowebui: bool, files=None):
        """Start-up as webui.py does it, instead of ``load_script``: ``initialize()`` loads every script
        (``scripts.load_scripts``: the WebUI's own scripts/ first, xyz_grid.py among them, then
        ``extension_scripts``; ``files`` replaces that order), then

        - ``nowebui`` (``api_only_worker``): ``create_api`` -> ``Api()``, which builds the script runners and calls
          every ``ui()`` itself, then ``before_ui_callback()``, then ``app_started_callback(None, app)``;
        - else (``webui_worker`` with ``--api``): ``before_ui_callback()``, ``ui.create_ui()``, ``create_api``,
          ``app_started_callback(demo, app)``.

        Returns the ``Api`` (also what ``api()`` returns afterwards)."""
        scripts = self.modules.scripts
        callbacks = self.modules.script_callbacks
        scripts.load_scripts(extension_scripts, files=files)
        self.loaded_scripts = [(d.path, d.module) for d in scripts.scripts_data]
        demo = None
        if nowebui:
            self._api = importlib.import_module("modules.api.api").Api()
            callbacks.before_ui_callback()
        else:
            callbacks.before_ui_callback()
            demo = self.modules.ui.create_ui()
            self._api = importlib.import_module("modules.api.api").Api()
        callbacks.app_started_callback(demo, None)
        self._snapshot_callbacks()
        return self._api

    def script(self, title: str | None = None, *, is_img2img: bool = False):
        """The runner's instance of a loaded script (by title; default: the last loaded one)."""
        scripts = self.modules.scripts
        runner = scripts.scripts_img2img if is_img2img else scripts.scripts_txt2img
        if title is not None:
            return runner.script(title)
        if not self.loaded_scripts:
            return None
        path = pathlib.Path(self.loaded_scripts[-1][0]).resolve()
        found = [s for s in runner.scripts if pathlib.Path(s.filename).resolve() == path]
        return found[-1] if found else None

    def default_args(self, *, is_img2img: bool = False) -> list:
        """The full args list the WebUI would start from: position 0 = 0, then each script's ui() values."""
        api = self.api()
        runner = self.modules.scripts.scripts_img2img if is_img2img else self.modules.scripts.scripts_txt2img
        return api.init_default_script_args(runner)

    def _full_args(self, is_img2img, script_args, args_by_title, all_script_args):
        if all_script_args is not None:
            return tuple(all_script_args)
        scripts = self.modules.scripts
        runner = scripts.scripts_img2img if is_img2img else scripts.scripts_txt2img
        if not runner.scripts:
            return ()
        full = self.default_args(is_img2img=is_img2img)
        requests = dict(args_by_title or {})
        if script_args is not None:
            target = self.script(is_img2img=is_img2img)
            if target is None:
                raise ValueError("script_args given but no script is loaded")
            requests[target.title()] = script_args
        for title, values in requests.items():
            script = runner.script(title)
            if script is None:
                raise ValueError(f"no script titled {title!r}")
            values = list(values)
            if len(values) > script.args_to - script.args_from:
                raise ValueError(f"{title!r} takes {script.args_to - script.args_from} args, got {len(values)}")
            full[script.args_from : script.args_from + len(values)] = values
        return tuple(full)

    # ---- generation ---------------------------------------------------------------------------
    def _run(self, p, is_img2img):
        shared = self.modules.shared
        runner = self.modules.scripts.scripts_img2img if is_img2img else self.modules.scripts.scripts_txt2img
        self.last_p = p
        shared.state.begin(job="img2img" if is_img2img else "txt2img")
        try:
            processed = runner.run(p, *p.script_args) if p.script_args else None
            if processed is None:
                processed = self.modules.processing.process_images(p)
        finally:
            shared.state.end()
        return processed

    def txt2img(self, *, script_args=None, args_by_title=None, all_script_args=None, **kw):
        """UI-style txt2img: ``StableDiffusionProcessingTxt2Img(**kw)`` with the script args (only the
        last loaded script's, from its first arg; or per title; or the whole list), then ``process_images``.
        Unset fields keep the processing defaults (``hr_cfg`` 1.0, sampler ``DPM++ 2M`` after autocorrection)."""
        processing = self.modules.processing
        p = processing.StableDiffusionProcessingTxt2Img(**kw)
        p.scripts = self.modules.scripts.scripts_txt2img
        p.script_args = self._full_args(False, script_args, args_by_title, all_script_args)
        return self._run(p, False)

    def img2img(self, *, init_images=None, mask=None, script_args=None, args_by_title=None, all_script_args=None, **kw):
        """UI-style img2img.  Without ``init_images`` a deterministic colour-gradient picture is used."""
        processing = self.modules.processing
        if init_images is None:
            init_images = [make_test_image(kw.get("width", 512), kw.get("height", 512))]
        p = processing.StableDiffusionProcessingImg2Img(init_images=init_images, mask=mask, **kw)
        p.scripts = self.modules.scripts.scripts_img2img
        p.script_args = self._full_args(True, script_args, args_by_title, all_script_args)
        return self._run(p, True)

    def api(self):
        if self._api is None:
            self._api = importlib.import_module("modules.api.api").Api()
        return self._api

    def _api_call(self, method: str, payload: dict) -> tuple[int, dict]:
        api_module = importlib.import_module("modules.api.api")
        try:
            return 200, getattr(self.api(), method)(payload)
        except api_module.HTTPException as e:
            return e.status_code, {"detail": e.detail}
        except Exception as e:  # the WebUI's API middleware turns it into a 500 with the message
            return 500, {"error": type(e).__name__, "detail": "", "body": "", "errors": str(e)}

    def api_txt2img(self, payload: dict) -> tuple[int, dict]:
        """``/sdapi/v1/txt2img`` with a JSON-like dict: ``(status_code, body)``; on 200 the body has ``images``
        (base64), ``info`` and ``processed`` (the Processed object, double only); an ``HTTPException`` gives its
        status and ``{"detail": ...}``, any other exception 500 with the message in ``body["errors"]``."""
        return self._api_call("text2imgapi", payload)

    def api_img2img(self, payload: dict) -> tuple[int, dict]:
        return self._api_call("img2imgapi", payload)

    def load_checkpoint(self, title: str):
        return self.modules.sd_models.load_checkpoint(title)


def make_test_image(width: int, height: int):
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) * 127 // max(width + height - 2, 1)],
        -1,
    )
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _lib_attn_must_not_call(fn, what: str, flavour: str):
    """``fn`` for the double's own callers; a call from the toolkit fails (``flavour`` has no ``what``)."""

    def guarded(*args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__", "").startswith("lib_attn"):
            raise AssertionError(f"the toolkit called {what}, which {flavour} does not have")
        return fn(*args, **kwargs)

    return guarded


def _apply_flavour(flavour: str) -> None:
    """Turn the Forge 2 double into one of the WebUIs on the old ``ldm_patched`` backend, where they differ in ways the
    toolkit meets (docs/forks.md): ``ldm_patched`` packages with the host's attention and sampler functions
    (``tests/fakes/forks/<flavour>``), ``backend.*`` functions out of the toolkit's reach, one
    ``process_before_every_sampling`` call in the hires pass, negative conds made at CFG 1 too, the patcher's CFG
    setters, and for reForge its CFG step (pre-CFG functions after the model call, ``uncond=None`` for post-CFG
    functions at CFG 1)."""
    importlib.import_module("modules_forge.forge_version").version = FLAVOURS[flavour]
    if flavour == "forge2":
        return
    sys.path.insert(0, str(FORKS_ROOT / flavour))
    importlib.invalidate_caches()
    fork_attention = importlib.import_module("ldm_patched.ldm.modules.attention")
    samplers = importlib.import_module("ldm_patched.modules.samplers")
    processing = importlib.import_module("modules.processing")
    processing.HIRES_HOOK_TWICE = processing.NO_UC_AT_CFG_1 = False
    unet = importlib.import_module("backend.nn.unet")
    unet.attention = types.SimpleNamespace(
        attention_function=lambda q, k, v, heads: fork_attention.optimized_attention(q, k, v, heads)
    )
    backend_attention = importlib.import_module("backend.attention")
    backend_attention.attention_function = _lib_attn_must_not_call(
        backend_attention.attention_function, "backend.attention.attention_function", flavour
    )
    sampling = importlib.import_module("backend.sampling.sampling_function")
    sampling.calc_cond_uncond_batch = _lib_attn_must_not_call(
        sampling.calc_cond_uncond_batch, "backend.sampling.sampling_function.calc_cond_uncond_batch", flavour
    )
    patcher = importlib.import_module("backend.patcher.base").ModelPatcher
    if flavour == "classic":
        del patcher.set_model_sampler_pre_cfg_function  # Classic's patcher has only add_sampler_pre_cfg_function
    else:
        sampling.INNER = samplers.sampling_function

        def set_model_sampler_calc_cond_batch_function(self, fn):
            self.model_options["sampler_calc_cond_batch_function"] = fn

        patcher.set_model_sampler_calc_cond_batch_function = set_model_sampler_calc_cond_batch_function


@contextlib.contextmanager
def forge_host(
    kind: str = "sd1",
    *,
    opts: dict | None = None,
    inference_weights: bool = False,
    model_factory=None,
    flavour: str = "forge2",
):
    """Enter the Forge 2.x double with a tiny ``kind`` model loaded ("sd1", "sd2", "sdxl" or "flux").

    ``opts``: values for ``shared.opts`` (e.g. ``{"skip_early_cond": 0.2}``); ``inference_weights``: make
    the UNet parameters inference tensors, as Forge's ``@torch.inference_mode`` loader does;
    ``model_factory(kind, seed)``: replaces ``tests.support.tiny.make_sd_model``; ``flavour``: "forge2", or the forks
    on the ``ldm_patched`` backend, "reforge" and "classic" (see ``_apply_flavour``)."""
    if kind not in CHECKPOINTS:
        raise ValueError(f"kind must be one of {sorted(CHECKPOINTS)}")
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {sorted(FLAVOURS)}")
    saved_path = list(sys.path)
    saved = _detach([n for n in list(sys.modules) if _is_host_module(n)])
    _load_k_diffusion()
    import k_diffusion.sampling

    sys.path.insert(0, str(FORGE_ROOT))
    importlib.invalidate_caches()
    try:
        shared = importlib.import_module("modules.shared")
        sd_models = importlib.import_module("modules.sd_models")
        importlib.import_module("modules.errors").reported.clear()
        importlib.import_module("modules.api.api")  # so that h.modules.api.api resolves
        _apply_flavour(flavour)
        sd_models.inference_weights = inference_weights
        if model_factory is not None:
            sd_models.model_factory = model_factory
        for key, value in (opts or {}).items():
            shared.opts.set(key, value)
        handle = ForgeHost(kind)
        sd_models.load_checkpoint(CHECKPOINTS[kind])
        yield handle
    finally:
        k_diffusion.sampling.torch = torch
        _detach([n for n in list(sys.modules) if _is_host_module(n)])
        sys.path[:] = saved_path
        _attach(saved)
        importlib.invalidate_caches()
