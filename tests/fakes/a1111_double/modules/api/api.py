"""Double of modules/api/api.py: image decoding as A1111 does it, the script args of /sdapi/v1/txt2img and
/sdapi/v1/img2img (defaults from ui(), titles matched case-insensitively, ``script_name`` + ``script_args`` for the
selected script), and the script part of ``Api.__init__`` with /sdapi/v1/scripts and /sdapi/v1/script-info."""

import base64
import io

from modules import shared
from PIL import Image


class HTTPException(Exception):
    def __init__(self, status_code, detail):
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


def decode_base64_to_image(encoding):
    if encoding.startswith(("http://", "https://")):
        if not shared.opts.api_enable_requests:
            raise HTTPException(status_code=500, detail="Requests not allowed")
        raise HTTPException(status_code=500, detail="no network in the test double")
    if encoding.startswith("data:image/"):
        encoding = encoding.split(";")[1].split(",")[1]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(encoding)))
        image.load()
        return image
    except Exception as e:
        raise HTTPException(status_code=500, detail="Invalid encoded image") from e


def encode_pil_to_base64(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def get_script(name, runner):
    for script in runner.scripts:
        if script.title().lower() == name.lower():
            return script
    raise HTTPException(status_code=422, detail=f"Script '{name}' not found")


def script_name_to_index(name, scripts):
    try:
        return [s.title().lower() for s in scripts].index(name.lower())
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"Script '{name}' not found") from e


def get_selectable_script(script_name, runner):
    if script_name is None or script_name == "":
        return None, None
    idx = script_name_to_index(script_name, runner.selectable_scripts)
    return runner.selectable_scripts[idx], idx


def init_script_args(request: dict, default_script_args, runner, selectable_script=None, selectable_idx=None):
    script_args = list(default_script_args)
    if selectable_script:  # position 0 is the selected script's index + 1 (what ScriptRunner.run reads)
        script_args[selectable_script.args_from:selectable_script.args_to] = request.get("script_args", [])
        script_args[0] = selectable_idx + 1
    for name, body in (request.get("alwayson_scripts") or {}).items():
        script = get_script(name, runner)
        if not script.alwayson:
            raise HTTPException(status_code=422, detail="Cannot have a selectable script in the always on scripts params")
        args = body.get("args", []) if isinstance(body, dict) else []
        for i in range(min(len(args), script.args_to - script.args_from)):
            script_args[script.args_from + i] = args[i]
    return script_args


class Api:
    def __init__(self, app=None, queue_lock=None):
        """The script part of ``Api.__init__``: when a runner has no scripts yet (``--nowebui``: ``load_scripts``
        left both empty and no UI was built), build the UI's script runners now (``ui.create_ui()``, which calls
        every script's ``ui()``), then compute both tabs' default args (another ``ui()`` call per script)."""
        from modules import scripts, ui

        self.app = app
        self.queue_lock = queue_lock
        self.default_script_arg_txt2img = []
        self.default_script_arg_img2img = []
        txt2img_script_runner = scripts.scripts_txt2img
        img2img_script_runner = scripts.scripts_img2img
        if not txt2img_script_runner.scripts or not img2img_script_runner.scripts:
            ui.create_ui()
        if not txt2img_script_runner.scripts:
            txt2img_script_runner.initialize_scripts(False)
        if not self.default_script_arg_txt2img:
            self.default_script_arg_txt2img = self.init_default_script_args(txt2img_script_runner)
        if not img2img_script_runner.scripts:
            img2img_script_runner.initialize_scripts(True)
        if not self.default_script_arg_img2img:
            self.default_script_arg_img2img = self.init_default_script_args(img2img_script_runner)

    def init_default_script_args(self, script_runner):
        import gradio as gr

        last = 1
        for script in script_runner.scripts:
            last = max(last, script.args_to or 1)
        script_args = [None] * last
        script_args[0] = 0
        with gr.Blocks():
            for script in script_runner.scripts:
                if script.ui(script.is_img2img):
                    script_args[script.args_from:script.args_to] = [e.value for e in script.ui(script.is_img2img)]
        return script_args

    def get_scripts_list(self):
        """``/sdapi/v1/scripts``"""
        from modules import scripts

        return {"txt2img": [s.name for s in scripts.scripts_txt2img.scripts if s.name is not None],
                "img2img": [s.name for s in scripts.scripts_img2img.scripts if s.name is not None]}

    def get_script_info(self):
        """``/sdapi/v1/script-info``: each script's ``api_info`` as recorded when the UI was built."""
        from modules import scripts

        res = []
        for script_list in (scripts.scripts_txt2img.scripts, scripts.scripts_img2img.scripts):
            res += [s.api_info for s in script_list if s.api_info is not None]
        return res
