"""Put the A1111 double on sys.path for a ``with`` block, with a tiny real-ldm model loaded.

    with a1111_host("sd1") as h:
        h.load_script("scripts/attention_toolkit.py")
        out = h.txt2img(prompt="a cat", steps=4, script_args=[...])

Everything imported from the double (``modules.*``) and the extension's host adapters (``lib_attn.host.*``,
which import ``modules``) is dropped from ``sys.modules`` on entry and exit, so tests can switch between the
A1111 and the Forge double in one process.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import pathlib
import sys
from types import SimpleNamespace

import torch

from tests.support.harness import HarnessBase

FAKES = pathlib.Path(__file__).resolve().parent / "a1111_double"
HOST_PREFIXES = ("modules", "backend", "ldm_patched", "modules_forge", "lib_attn.host.")


def _is_host_module(name: str) -> bool:
    return any(name == p.rstrip(".") or name.startswith(p if p.endswith(".") else p + ".") for p in HOST_PREFIXES)


@contextlib.contextmanager
def isolated_host(path: pathlib.Path):
    saved_path = list(sys.path)
    saved = {k: v for k, v in sys.modules.items() if _is_host_module(k)}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        for k in [k for k in sys.modules if _is_host_module(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
        sys.path[:] = saved_path


def load_script_module(path: pathlib.Path):
    """Load a script file like the WebUI's script loader: module name = file basename, extension root on
    sys.path while it runs."""
    path = pathlib.Path(path).resolve()
    root = str(path.parent.parent)
    sys.path.insert(0, root)
    try:
        spec = importlib.util.spec_from_file_location(path.name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(root)
    return module


class A1111Host(HarnessBase):
    """Handle yielded by ``a1111_host``; its common API with ``ForgeHost`` is ``tests.support.harness.Harness``."""

    def __init__(self, kind: str, models: dict | None, dtype=None, device=None):
        from tests.support.tiny import make_sd_model

        names = ["shared", "script_callbacks", "processing", "scripts", "prompt_parser", "sd_models", "errors",
                 "sd_samplers", "infotext_utils"]
        self.modules = SimpleNamespace(**{n: importlib.import_module(f"modules.{n}") for n in names})
        self.modules.api = importlib.import_module("modules.api.api")
        m = self.modules
        m.shared.opts.reset()
        m.shared.state.reset()
        m.script_callbacks.clear_callbacks()
        m.errors.reported.clear()
        factories = {kind: lambda: make_sd_model(kind)}
        factories.update(models or {})
        if dtype is not None or device is not None:  # float64 for exact comparisons; a GPU for benchmarks
            # (the WebUI's ``devices.device``: the model, the noise and the sigmas live there)
            importlib.import_module("modules.devices").device = torch.device(device or "cpu")
            factories = {t: (lambda f=f: f().to(device=device, dtype=dtype)) for t, f in factories.items()}
        factories = {t: (lambda f=f: self._watch(f())) for t, f in factories.items()}
        self.loaded_scripts: list = []  # (path, module)
        self.unet_calls: list[dict] = []
        self._baseline: set[int] = set()
        self._baseline_refs: list = []  # keeps the ids in _baseline from being reused
        for title, factory in factories.items():
            m.sd_models.register(title, factory)
        m.shared.sd_model = None
        m.sd_models.reload_model_weights(info=m.sd_models.get_closet_checkpoint_match(kind))
        self.runners = {False: m.scripts.ScriptRunner(False), True: m.scripts.ScriptRunner(True)}
        m.scripts.scripts_txt2img, m.scripts.scripts_img2img = self.runners[False], self.runners[True]
        self.server = None  # the modules.api.api.Api made by start()

    # ---- observation --------------------------------------------------------------------------
    def _watch(self, model):
        """Record every ``sd_model.apply_model`` call of a model made by a registered factory (an instance
        attribute on the model, so the UNet's modules carry no extra hook)."""
        inner = model.apply_model

        def apply_model(x, t, *args, **kwargs):
            self.unet_calls.append({"rows": int(x.shape[0]), "shape": tuple(x.shape), "timestep": float(t[0]),
                                    "inference_mode": torch.is_inference_mode_enabled()})
            return inner(x, t, *args, **kwargs)

        model.apply_model = apply_model
        return model

    def load_script(self, path):
        import gradio as gr

        module = load_script_module(path)
        classes = [c for c in vars(module).values()
                   if isinstance(c, type) and issubclass(c, self.modules.scripts.Script) and c is not self.modules.scripts.Script]
        for runner in self.runners.values():
            for cls in classes:
                script = cls()
                script.filename = str(path)
                runner.add(script)
                with gr.Blocks():
                    runner.create_script_ui(script)
        self.modules.script_callbacks.before_ui_callback()
        self.loaded_scripts.append((str(path), module))
        self._snapshot_callbacks()
        return module

    def start(self, extension_scripts, *, nowebui: bool, files=None):
        """Start-up as webui.py does it, instead of ``load_script``: ``initialize()`` loads every script
        (``scripts.load_scripts``: the WebUI's own scripts/ first, xyz_grid.py among them, then
        ``extension_scripts``; ``files`` replaces that order), then

        - ``nowebui`` (``api_only()``): ``create_api`` -> ``Api()``, which builds the script runners and calls every
          ``ui()`` itself, then ``before_ui_callback()``, then ``app_started_callback(None, app)``;
        - else (``webui()`` with ``--api``): ``before_ui_callback()``, ``ui.create_ui()``, ``create_api``,
          ``app_started_callback(demo, app)``.

        Returns the ``Api``; ``api_txt2img``/``api_img2img`` then take their default args from it."""
        import importlib

        m = self.modules
        m.scripts.load_scripts(extension_scripts, files=files)
        demo = None
        if nowebui:
            self.server = m.api.Api()
            m.script_callbacks.before_ui_callback()
        else:
            m.script_callbacks.before_ui_callback()
            demo = importlib.import_module("modules.ui").create_ui()
            self.server = m.api.Api()
        m.script_callbacks.app_started_callback(demo, None)
        self.runners = {False: m.scripts.scripts_txt2img, True: m.scripts.scripts_img2img}
        self.loaded_scripts = [(d.path, d.module) for d in m.scripts.scripts_data]
        self._snapshot_callbacks()
        return self.server

    def script(self, title: str | None = None, *, is_img2img: bool = False):
        """The runner's instance of a loaded script (by title; default: the last loaded one)."""
        runner = self.runners[is_img2img]
        if title is not None:
            return next((s for s in runner.scripts if s.title() == title), None)
        if not self.loaded_scripts:
            return None
        path = pathlib.Path(self.loaded_scripts[-1][0]).resolve()
        found = [s for s in runner.scripts if pathlib.Path(s.filename).resolve() == path]
        return found[-1] if found else None

    def default_args(self, *, is_img2img: bool = False) -> list:
        """The full args list the WebUI would start from: position 0 = None, then each script's ui() values."""
        runner = self.runners[is_img2img]
        return [None] + [getattr(c, "value", None) for c in runner.inputs[1:]]

    def _args(self, is_img2img, script_args):
        args = self.default_args(is_img2img=is_img2img)
        if script_args is not None and self.runners[is_img2img].scripts:
            s = self.script(is_img2img=is_img2img)
            if s is None:
                raise ValueError("script_args given but no script is loaded")
            for i, v in enumerate(list(script_args)[: s.args_to - s.args_from]):
                args[s.args_from + i] = v
        return args

    def txt2img(self, *, script_args=None, **kw):
        m = self.modules
        p = m.processing.StableDiffusionProcessingTxt2Img(scripts=self.runners[False],
                                                          script_args=self._args(False, script_args), **kw)
        return m.processing.process_images(p)

    def img2img(self, *, script_args=None, **kw):
        m = self.modules
        p = m.processing.StableDiffusionProcessingImg2Img(scripts=self.runners[True],
                                                          script_args=self._args(True, script_args), **kw)
        return m.processing.process_images(p)

    def _api(self, payload: dict, is_img2img: bool) -> tuple[int, dict]:
        m = self.modules
        payload = dict(payload)
        runner = self.runners[is_img2img]
        if self.server is not None:
            defaults = self.server.default_script_arg_img2img if is_img2img else self.server.default_script_arg_txt2img
        else:
            defaults = self.default_args(is_img2img=is_img2img)
        try:
            selectable, selectable_idx = m.api.get_selectable_script(payload.pop("script_name", None), runner)
            args = m.api.init_script_args(payload, defaults, runner, selectable, selectable_idx)
            payload.pop("script_args", None)
            payload.pop("alwayson_scripts", None)
            if is_img2img:
                payload["init_images"] = [m.api.decode_base64_to_image(s) for s in payload.get("init_images", [])]
                if payload.get("mask"):
                    payload["mask"] = m.api.decode_base64_to_image(payload["mask"])
                cls = m.processing.StableDiffusionProcessingImg2Img
            else:
                cls = m.processing.StableDiffusionProcessingTxt2Img
            p = cls(scripts=runner, script_args=args, **payload)
            p.is_api = True
            # the selected script (e.g. X/Y/Z plot) runs the generations itself
            processed = runner.run(p, *args) if selectable is not None else m.processing.process_images(p)
        except m.api.HTTPException as e:
            return e.status_code, {"detail": e.detail}
        except Exception as e:  # A1111's API middleware turns it into a 500 with the message
            return 500, {"error": type(e).__name__, "detail": "", "body": "", "errors": str(e)}
        images = [m.api.encode_pil_to_base64(im) for im in processed.images]
        return 200, {"images": images, "parameters": {}, "info": processed.js()}

    def api_txt2img(self, payload: dict) -> tuple[int, dict]:
        """``/sdapi/v1/txt2img`` with a JSON-like dict: ``(status_code, body)``; an ``HTTPException`` gives its
        status and ``{"detail": ...}``, any other exception 500 with the message in ``body["errors"]``."""
        return self._api(payload, False)

    def api_img2img(self, payload: dict) -> tuple[int, dict]:
        return self._api(payload, True)


def info_of(response: dict) -> dict:
    return json.loads(response["info"])


@contextlib.contextmanager
def a1111_host(kind: str = "sd1", *, opts: dict | None = None, models: dict | None = None, dtype=None, device=None,
               cmd_opts: dict | None = None):
    """The A1111 double with the model ``kind`` loaded; ``opts``: settings; ``cmd_opts``: command-line flags
    (``medvram``, ``lowvram``, ``opt_sdp_no_mem_attention``: the model loads and the attention forward is chosen
    under them)."""
    with isolated_host(FAKES):
        from modules import sd_hijack_optimizations, shared

        for k, v in (cmd_opts or {}).items():
            assert hasattr(shared.cmd_opts, k), f"the double has no command-line flag {k}"
            setattr(shared.cmd_opts, k, v)
        sd_hijack_optimizations.apply()  # the WebUI's cross-attention optimization (sdp by default), class-level
        try:
            host = A1111Host(kind, models, dtype, device)
            for k, v in (opts or {}).items():
                setattr(host.modules.shared.opts, k, v)
            yield host
        finally:
            sd_hijack_optimizations.undo()
