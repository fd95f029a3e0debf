"""Double of modules/scripts.py: Script base, AlwaysOn runner, hook dispatch with A1111's error handling."""

from dataclasses import dataclass
from typing import Any

from modules import errors

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

    def create_script_ui(self, script):
        script.args_from = len(self.inputs)
        controls = script.ui(script.is_img2img) or []
        script.controls = controls
        self.inputs.extend(controls)
        script.args_to = len(self.inputs)
        if script.infotext_fields:
            self.infotext_fields.extend(script.infotext_fields)
        if script.paste_field_names:
            self.paste_field_names.extend(script.paste_field_names)

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
scripts_data = []
