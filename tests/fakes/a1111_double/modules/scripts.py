"""Double of modules/scripts.py: Script base, AlwaysOn runner, hook dispatch with A1111's error handling, and the
start-up path (``load_scripts``, ``initialize_scripts``, ``setup_ui``, ``run`` for the selected script)."""

import inspect
import os
import sys
from collections import namedtuple
from dataclasses import dataclass
from typing import Any

from modules import errors, paths, script_callbacks, script_loading

AlwaysVisible = object()


@dataclass
class MaskBlendArgs:
    current_latent: Any
    nmask: Any
    init_latent: Any
    mask: Any
    blended_latent: Any
    denoiser: Any = None
    sigma: Any = None

    def __post_init__(self):
        self.is_final_blend = self.denoiser is None


@dataclass
class PostSampleArgs:
    samples: Any


@dataclass
class PostprocessImageArgs:
    image: Any


@dataclass
class PostprocessBatchListArgs:
    images: Any


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    setup_for_ui_only = False
    controls = None
    sorting_priority = 0

    def title(self):
        raise NotImplementedError

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def before_hr(self, p, *args):
        pass

    def on_mask_blend(self, p, mba, *args):
        pass

    def post_sample(self, p, ps, *args):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_image(self, p, pp, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def elem_id(self, item_id):
        title = "".join(c if c.isalnum() or c == "_" else "_" for c in self.title().lower())
        tab = f"{self.tabname}_" if self.tabname else ""
        return f"script_{tab}{title}_{item_id}"


class ScriptRunner:
    def __init__(self, is_img2img=False):
        self.is_img2img = is_img2img
        self.scripts = []
        self.alwayson_scripts = []
        self.selectable_scripts = []
        self.inputs = [None]
        self.infotext_fields = []
        self.paste_field_names = []
        self.title_map = {}
        self.titles = []

    def add(self, script):
        script.is_img2img = self.is_img2img
        script.is_txt2img = not self.is_img2img
        script.tabname = "img2img" if self.is_img2img else "txt2img"
        if script.show(self.is_img2img) is AlwaysVisible:
            script.alwayson = True
            self.alwayson_scripts.append(script)
        else:
            self.selectable_scripts.append(script)
        self.scripts.append(script)

    def initialize_scripts(self, is_img2img):
        """A new instance of every loaded script class, in ``scripts_data`` order; AlwaysOn ones also go to
        ``alwayson_scripts``, others that show in this tab to ``selectable_scripts``."""
        self.is_img2img = is_img2img
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()
        for script_data in scripts_data:
            try:
                script = script_data.script_class()
            except Exception:
                errors.report(f"Error # failed to initialize Script {script_data.module}: ", exc_info=True)
                continue
            script.filename = script_data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            visibility = script.show(script.is_img2img)
            if visibility is AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

    def create_script_ui(self, script):
        from modules.api import models as api_models

        script.args_from = len(self.inputs)
        controls = script.ui(script.is_img2img) or []
        script.controls = controls
        script.name = script.title().lower()
        args = []
        for control in controls:
            arg = api_models.ScriptArg(label=getattr(control, "label", None) or "")
            for field in ("value", "minimum", "maximum", "step"):
                if getattr(control, field, None) is not None:
                    setattr(arg, field, getattr(control, field))
            choices = getattr(control, "choices", None)
            if choices is not None:
                arg.choices = [x[0] if isinstance(x, tuple) else x for x in choices]
            args.append(arg)
        script.api_info = api_models.ScriptInfo(name=script.name, is_img2img=script.is_img2img,
                                                is_alwayson=script.alwayson, args=args)
        self.inputs.extend(controls)
        script.args_to = len(self.inputs)
        if script.infotext_fields:
            self.infotext_fields.extend(script.infotext_fields)
        if script.paste_field_names:
            self.paste_field_names.extend(script.paste_field_names)

    def prepare_ui(self):
        self.inputs = [None]

    def setup_ui(self):
        """Inside ``gr.Blocks()``: the AlwaysOn scripts' controls, the "Script" dropdown (``inputs[0]``, an index:
        0 = None, i = ``selectable_scripts[i - 1]``), then the selectable scripts' controls."""
        import gradio as gr

        self.title_map = {s.title().lower(): s for s in self.scripts}
        self.titles = [s.title() for s in self.selectable_scripts]
        for script in self.alwayson_scripts:
            with gr.Group():
                self.create_script_ui(script)
        self.inputs[0] = gr.Dropdown(label="Script", elem_id="script_list", choices=["None", *self.titles],
                                     value="None", type="index")
        for script in self.selectable_scripts:
            with gr.Group(visible=False):
                self.create_script_ui(script)
        return self.inputs

    def run(self, p, *args):
        script_index = args[0]
        if script_index == 0 or script_index is None:
            return None
        script = self.selectable_scripts[script_index - 1]
        return script.run(p, *args[script.args_from:script.args_to])

    def script(self, title):
        return self.title_map.get(title.lower())

    def _run(self, method, p, *args, **kwargs):
        for script in self.alwayson_scripts:
            if getattr(type(script), method) is getattr(Script, method):
                continue  # 1.9+: only scripts that override the hook are called
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                getattr(script, method)(p, *args, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {method}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._run("before_process", p)

    def process(self, p):
        self._run("process", p)

    def before_process_batch(self, p, **kwargs):
        self._run("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._run("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._run("process_before_every_sampling", p, **kwargs)

    def before_hr(self, p):
        self._run("before_hr", p)

    def on_mask_blend(self, p, mba):
        self._run("on_mask_blend", p, mba)

    def post_sample(self, p, ps):
        self._run("post_sample", p, ps)

    def postprocess_batch(self, p, images, **kwargs):
        self._run("postprocess_batch", p, images=images, **kwargs)

    def postprocess_image(self, p, pp):
        self._run("postprocess_image", p, pp)

    def postprocess(self, p, processed):
        self._run("postprocess", p, processed)


scripts_txt2img = ScriptRunner(False)
scripts_img2img = ScriptRunner(True)
scripts_current = None
ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []

builtin_scripts_dir = os.path.join(os.path.dirname(paths.script_path), "builtin_scripts")
"""Stands for the WebUI's own ``scripts/`` folder (``os.path.join(paths.script_path, "scripts")``; the doubles share
one: tests/fakes/builtin_scripts)."""


def list_scripts(extension_scripts=()):
    """``list_scripts("scripts", ".py")`` without metadata.ini ordering: the WebUI's own ``scripts/*.py`` sorted by
    file name first (basedir ``paths.script_path``), then the extensions' script files in the order given."""
    files = []
    if os.path.isdir(builtin_scripts_dir):
        for filename in sorted(os.listdir(builtin_scripts_dir)):
            path = os.path.join(builtin_scripts_dir, filename)
            if os.path.isfile(path) and os.path.splitext(filename)[1].lower() == ".py":
                files.append(ScriptFile(paths.script_path, filename, path))
    for path in extension_scripts:
        path = os.path.abspath(str(path))
        files.append(ScriptFile(os.path.dirname(os.path.dirname(path)), os.path.basename(path), path))
    return files


def load_scripts(extension_scripts=(), *, files=None):
    """``load_scripts()`` as ``initialize_rest`` calls it at start-up: forget every script class and every script
    callback, load each file (``list_scripts`` order, or ``files``) with its extension folder in front of sys.path
    while it loads, register its Script classes in ``scripts_data``, then replace both runners by new, empty ones."""
    global scripts_txt2img, scripts_img2img
    scripts_data.clear()
    script_callbacks.clear_callbacks()
    for f in list_scripts(extension_scripts) if files is None else files:
        syspath = sys.path
        try:
            if f.basedir != paths.script_path:
                sys.path = [f.basedir, *sys.path]
            module = script_loading.load_module(f.path)
            for script_class in module.__dict__.values():
                if inspect.isclass(script_class) and issubclass(script_class, Script) and script_class is not Script:
                    scripts_data.append(ScriptClassData(script_class, f.path, f.basedir, module))
        except Exception:
            errors.report(f"Error loading script: {f.filename}", exc_info=True)
        finally:
            sys.path = syspath
    scripts_txt2img = ScriptRunner(False)
    scripts_img2img = ScriptRunner(True)
