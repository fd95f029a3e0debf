"""``modules.scripts`` as in Forge 2.x: Script base class and ScriptRunner.

Kept from Forge: ``sorting_priority``; hooks dispatched only to scripts overriding them
(``ordered_scripts``), each call in try/except -> ``errors.report``; ``p.script_args[args_from:args_to]``
passed positionally; ``before_process_init_images`` (Forge only); and Forge's **second** definition of
``process_before_every_sampling``, which loops over ``alwayson_scripts`` unordered (every AlwaysOn
script, overriding or not).
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from collections import namedtuple

from modules import errors, paths, script_callbacks, script_loading, shared

AlwaysVisible = object()


class MaskBlendArgs:
    def __init__(self, current_latent, nmask, init_latent, mask, blended_latent, denoiser=None, sigma=None):
        self.current_latent = current_latent
        self.nmask = nmask
        self.init_latent = init_latent
        self.mask = mask
        self.blended_latent = blended_latent
        self.denoiser = denoiser
        self.is_final_blend = denoiser is None
        self.sigma = sigma


class PostSampleArgs:
    def __init__(self, samples):
        self.samples = samples


class PostprocessImageArgs:
    def __init__(self, image, index):
        self.image = image
        self.index = index


class PostProcessMaskOverlayArgs:
    def __init__(self, index, mask_for_overlay, overlay_image):
        self.index = index
        self.mask_for_overlay = mask_for_overlay
        self.overlay_image = overlay_image


class PostprocessBatchListArgs:
    def __init__(self, images):
        self.images = images


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
    on_before_component_elem_id = None
    on_after_component_elem_id = None
    setup_for_ui_only = False
    controls = None
    sorting_priority = 0

    def title(self):
        raise NotImplementedError()

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

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, *args, **kwargs):
        pass

    def on_mask_blend(self, p, mba: MaskBlendArgs, *args):
        pass

    def post_sample(self, p, ps: PostSampleArgs, *args):
        pass

    def postprocess_image(self, p, pp: PostprocessImageArgs, *args):
        pass

    def postprocess_maskoverlay(self, p, ppmo: PostProcessMaskOverlayArgs, *args):
        pass

    def postprocess_image_after_composite(self, p, pp: PostprocessImageArgs, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_component(self, component, **kwargs):
        pass

    def after_component(self, component, **kwargs):
        pass

    def on_before_component(self, callback, *, elem_id):
        if self.on_before_component_elem_id is None:
            self.on_before_component_elem_id = []
        self.on_before_component_elem_id.append((elem_id, callback))

    def on_after_component(self, callback, *, elem_id):
        if self.on_after_component_elem_id is None:
            self.on_after_component_elem_id = []
        self.on_after_component_elem_id.append((elem_id, callback))

    def describe(self):
        return ""

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabname = f"{'img2img' if self.is_img2img else 'txt2img'}_" if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"

    def before_hr(self, p, *args):
        pass


class ScriptBuiltinUI(Script):
    setup_for_ui_only = True

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabname = ("img2img" if self.is_img2img else "txt2img") + "_" if need_tabname else ""
        return f"{tabname}{item_id}"

    def show(self, is_img2img):
        return AlwaysVisible


current_basedir = paths.script_path


def basedir():
    return current_basedir


ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data: list = []
postprocessing_scripts_data: list = []


def register_scripts_from_module(module, path, base):
    for script_class in module.__dict__.values():
        if inspect.isclass(script_class) and issubclass(script_class, Script):
            if script_class in (Script, ScriptBuiltinUI):
                continue
            scripts_data.append(ScriptClassData(script_class, path, base, module))


def load_script_file(path, base=None):
    """Load one script file as ``load_scripts`` does for each file: the base dir is put in front of
    ``sys.path`` while it loads (and kept there, as Forge does), the module is named after the basename."""
    global current_basedir
    path = os.path.abspath(str(path))
    base = base or os.path.dirname(os.path.dirname(path))
    if base not in sys.path:
        sys.path.insert(0, base)
    current_basedir = base
    try:
        module = script_loading.load_module(path)
        register_scripts_from_module(module, path, base)
        return module
    except Exception:
        errors.report(f"Error loading script: {os.path.basename(path)}", exc_info=True)
        return None
    finally:
        current_basedir = paths.script_path


builtin_scripts_dir = os.path.join(os.path.dirname(paths.script_path), "builtin_scripts")
"""Stands for the WebUI's own ``scripts/`` folder (``os.path.join(paths.script_path, "scripts")``; the doubles share
one: tests/fakes/builtin_scripts)."""


def list_scripts(extension_scripts=()):
    """``list_scripts("scripts", ".py")`` without metadata.ini ordering: the WebUI's own ``scripts/*.py`` sorted by
    file name first (basedir ``paths.script_path``), then the extensions' script files in the order given (Forge
    lists extensions-builtin, then extensions, each sorted by folder name)."""
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
    callback, load each file in ``list_scripts`` order (or ``files``, to test another order), then replace both
    runners by new, empty ones (their scripts are created later, by ``create_ui`` or by ``Api()``)."""
    scripts_data.clear()
    postprocessing_scripts_data.clear()
    script_callbacks.clear_callbacks()
    for f in list_scripts(extension_scripts) if files is None else files:
        load_script_file(f.path, f.basedir)
    create_runners()


def wrap_call(func, filename, funcname, *args, default=None, **kwargs):
    try:
        return func(*args, **kwargs)
    except Exception:
        errors.report(f"Error calling: {filename}/{funcname}", exc_info=True)
    return default


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []
        self.titles = []
        self.title_map = {}
        self.infotext_fields = []
        self.paste_field_names = []
        self.inputs = [None]
        self.callback_map = {}
        self.on_before_component_elem_id = {}
        self.on_after_component_elem_id = {}

    def initialize_scripts(self, is_img2img):
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
        self.callback_map.clear()

    def create_script_ui(self, script):
        script.args_from = len(self.inputs)
        script.args_to = len(self.inputs)
        try:
            self.create_script_ui_inner(script)
        except Exception:
            errors.report(f"Error creating UI for {script.name}: ", exc_info=True)

    def create_script_ui_inner(self, script):
        from modules.api import models as api_models

        controls = wrap_call(script.ui, script.filename, "ui", script.is_img2img)
        script.controls = controls
        if controls is None:
            return
        script.name = wrap_call(script.title, script.filename, "title", default=script.filename).lower()
        api_args = []
        for control in controls:
            control.custom_script_source = os.path.basename(script.filename)
            arg = api_models.ScriptArg(label=getattr(control, "label", None) or "")
            for field in ("value", "minimum", "maximum", "step"):
                v = getattr(control, field, None)
                if v is not None:
                    setattr(arg, field, v)
            choices = getattr(control, "choices", None)
            if choices is not None:
                arg.choices = [x[0] if isinstance(x, tuple) else x for x in choices]
            api_args.append(arg)
        script.api_info = api_models.ScriptInfo(
            name=script.name, is_img2img=script.is_img2img, is_alwayson=script.alwayson, args=api_args
        )
        if script.infotext_fields is not None:
            self.infotext_fields += script.infotext_fields
        if script.paste_field_names is not None:
            self.paste_field_names += script.paste_field_names
        self.inputs += list(controls)
        script.args_to = len(self.inputs)

    def setup_ui_for_section(self, section, scriptlist=None):
        import gradio as gr

        if scriptlist is None:
            scriptlist = self.alwayson_scripts
        for script in sorted(scriptlist, key=lambda x: x.sorting_priority):
            if script.alwayson and script.section != section:
                continue
            if script.create_group:
                with gr.Group(visible=script.alwayson) as group:
                    self.create_script_ui(script)
                script.group = group
            else:
                self.create_script_ui(script)

    def prepare_ui(self):
        self.inputs = [None]

    def setup_ui(self):
        """Build the script UI; call inside ``gr.Blocks()``."""
        import gradio as gr

        titles = [wrap_call(s.title, s.filename, "title") or s.filename for s in self.scripts]
        self.title_map = {t.lower(): s for t, s in zip(titles, self.scripts, strict=False)}
        self.titles = [
            wrap_call(s.title, s.filename, "title") or f"{s.filename} [error]" for s in self.selectable_scripts
        ]
        self.setup_ui_for_section(None)
        dropdown = gr.Dropdown(
            label="Script", elem_id="script_list", choices=["None", *self.titles], value="None", type="index"
        )
        self.inputs[0] = dropdown
        self.setup_ui_for_section(None, self.selectable_scripts)
        return self.inputs

    def run(self, p, *args):
        script_index = args[0]
        if script_index == 0 or script_index is None:
            return None
        script = self.selectable_scripts[script_index - 1]
        if script is None:
            return None
        return script.run(p, *args[script.args_from : script.args_to])

    def list_scripts_for_method(self, method_name):
        if method_name in ("before_component", "after_component"):
            return self.scripts
        return self.alwayson_scripts

    def create_ordered_callbacks_list(self, method_name, *, enable_user_sort=True):
        category = f"script_{method_name}"
        callbacks = []
        for script in self.list_scripts_for_method(method_name):
            if getattr(script.__class__, method_name, None) == getattr(Script, method_name, None):
                continue
            script_callbacks.add_callback(
                callbacks, script, category=category, name=script.__class__.__name__, filename=script.filename
            )
        return script_callbacks.sort_callbacks(category, callbacks, enable_user_sort=enable_user_sort)

    def ordered_callbacks(self, method_name, *, enable_user_sort=True):
        script_list = self.list_scripts_for_method(method_name)
        category = f"script_{method_name}"
        length, callbacks = self.callback_map.get(category, (-1, None))
        if callbacks is None or length != len(script_list):
            callbacks = self.create_ordered_callbacks_list(method_name, enable_user_sort=enable_user_sort)
            self.callback_map[category] = len(script_list), callbacks
        return callbacks

    def ordered_scripts(self, method_name):
        return [x.callback for x in self.ordered_callbacks(method_name)]

    def _dispatch(self, method_name, p, *pre, label=None, **kwargs):
        for script in self.ordered_scripts(method_name):
            try:
                script_args = p.script_args[script.args_from : script.args_to]
                getattr(script, method_name)(p, *pre, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {label or method_name}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._dispatch("before_process", p)

    def process(self, p):
        self._dispatch("process", p)

    def before_process_batch(self, p, **kwargs):
        self._dispatch("before_process_batch", p, **kwargs)

    def before_process_init_images(self, p, pp, **kwargs):
        self._dispatch("before_process_init_images", p, pp, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):
        self._dispatch("after_extra_networks_activate", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._dispatch("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        # Forge defines this method twice; this second, unordered loop over every AlwaysOn script wins.
        for script in self.alwayson_scripts:
            try:
                script_args = p.script_args[script.args_from : script.args_to]
                script.process_before_every_sampling(p, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running process_before_every_sampling: {script.filename}", exc_info=True)

    def postprocess(self, p, processed):
        for script in self.ordered_scripts("postprocess"):
            try:
                script_args = p.script_args[script.args_from : script.args_to]
                script.postprocess(p, processed, *script_args)
            except Exception:
                errors.report(f"Error running postprocess: {script.filename}", exc_info=True)

    def postprocess_batch(self, p, images, **kwargs):
        for script in self.ordered_scripts("postprocess_batch"):
            try:
                script_args = p.script_args[script.args_from : script.args_to]
                script.postprocess_batch(p, *script_args, images=images, **kwargs)
            except Exception:
                errors.report(f"Error running postprocess_batch: {script.filename}", exc_info=True)

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, **kwargs):
        self._dispatch("postprocess_batch_list", p, pp, **kwargs)

    def post_sample(self, p, ps: PostSampleArgs):
        self._dispatch("post_sample", p, ps)

    def on_mask_blend(self, p, mba: MaskBlendArgs):
        self._dispatch("on_mask_blend", p, mba, label="post_sample")

    def postprocess_image(self, p, pp: PostprocessImageArgs):
        self._dispatch("postprocess_image", p, pp)

    def postprocess_maskoverlay(self, p, ppmo: PostProcessMaskOverlayArgs):
        self._dispatch("postprocess_maskoverlay", p, ppmo, label="postprocess_image")

    def postprocess_image_after_composite(self, p, pp: PostprocessImageArgs):
        self._dispatch("postprocess_image_after_composite", p, pp)

    def before_hr(self, p):
        self._dispatch("before_hr", p)

    def setup_scrips(self, p, *, is_ui=True):
        for script in self.ordered_scripts("setup"):
            if not is_ui and script.setup_for_ui_only:
                continue
            try:
                script_args = p.script_args[script.args_from : script.args_to]
                script.setup(p, *script_args)
            except Exception:
                errors.report(f"Error running setup: {script.filename}", exc_info=True)

    def before_component(self, component, **kwargs):
        for script in self.ordered_scripts("before_component"):
            try:
                script.before_component(component, **kwargs)
            except Exception:
                errors.report(f"Error running before_component: {script.filename}", exc_info=True)

    def after_component(self, component, **kwargs):
        for script in self.ordered_scripts("after_component"):
            try:
                script.after_component(component, **kwargs)
            except Exception:
                errors.report(f"Error running after_component: {script.filename}", exc_info=True)

    def script(self, title):
        return self.title_map.get(title.lower())


scripts_txt2img: ScriptRunner | None = None
scripts_img2img: ScriptRunner | None = None
scripts_current: ScriptRunner | None = None


def create_runners():
    global scripts_txt2img, scripts_img2img
    scripts_txt2img = ScriptRunner()
    scripts_img2img = ScriptRunner()


create_runners()
_ = shared  # keep the import like the WebUI module does
