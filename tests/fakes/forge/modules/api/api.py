"""``modules.api.api``: ``decode_base64_to_image`` and a minimal ``Api`` for txt2img/img2img requests.

The request is a plain dict shaped like the JSON body of ``/sdapi/v1/txt2img`` / ``img2img``.  AlwaysOn
script args follow the WebUI: defaults are the ``.value`` of each component returned by a fresh ``ui()``
call made inside ``gradio.Blocks()`` (computed once per runner), ``alwayson_scripts`` keys are matched
against ``title()`` case-insensitively (unknown -> HTTP 422), and ``args`` are copied in place, positionally
and unconverted, up to the script's arg count.
"""

from __future__ import annotations

import base64
import io
import json

from modules import processing, scripts, sd_samplers, shared
from modules.shared import opts
from PIL import Image


class HTTPException(Exception):
    def __init__(self, status_code: int, detail: str = ""):
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


def decode_base64_to_image(encoding):
    if encoding.startswith(("http://", "https://")):
        if not opts.api_enable_requests:
            raise HTTPException(status_code=500, detail="Requests not allowed")
        raise HTTPException(status_code=500, detail="URL requests are not available in the double")
    if encoding.startswith("data:image/"):
        encoding = encoding.split(";")[1].split(",")[1]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(encoding)))
        image.load()
        return image
    except Exception as e:
        raise HTTPException(status_code=500, detail="Invalid encoded image") from e


def encode_pil_to_base64(image):
    if isinstance(image, str):
        return image
    with io.BytesIO() as out:
        image.save(out, format="PNG")
        return base64.b64encode(out.getvalue()).decode("ascii")


def script_name_to_index(name, script_list):
    try:
        return [s.title().lower() for s in script_list].index(name.lower())
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"Script '{name}' not found") from e


_TXT2IMG_FIELDS = {
    "prompt",
    "negative_prompt",
    "styles",
    "seed",
    "subseed",
    "subseed_strength",
    "seed_resize_from_h",
    "seed_resize_from_w",
    "sampler_name",
    "scheduler",
    "batch_size",
    "n_iter",
    "steps",
    "cfg_scale",
    "distilled_cfg_scale",
    "width",
    "height",
    "restore_faces",
    "tiling",
    "do_not_save_samples",
    "do_not_save_grid",
    "eta",
    "denoising_strength",
    "s_min_uncond",
    "s_churn",
    "s_tmax",
    "s_tmin",
    "s_noise",
    "override_settings",
    "override_settings_restore_afterwards",
    "refiner_checkpoint",
    "refiner_switch_at",
    "disable_extra_networks",
    "firstpass_image",
    "enable_hr",
    "firstphase_width",
    "firstphase_height",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_checkpoint_name",
    "hr_additional_modules",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
    "hr_cfg",
    "hr_distilled_cfg",
}
_IMG2IMG_FIELDS = (
    _TXT2IMG_FIELDS
    - {
        "enable_hr",
        "firstphase_width",
        "firstphase_height",
        "hr_scale",
        "hr_upscaler",
        "hr_second_pass_steps",
        "hr_resize_x",
        "hr_resize_y",
        "hr_checkpoint_name",
        "hr_additional_modules",
        "hr_sampler_name",
        "hr_scheduler",
        "hr_prompt",
        "hr_negative_prompt",
        "hr_cfg",
        "firstpass_image",
    }
) | {
    "init_images",
    "resize_mode",
    "image_cfg_scale",
    "mask",
    "mask_blur_x",
    "mask_blur_y",
    "mask_blur",
    "mask_round",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "inpainting_mask_invert",
    "initial_noise_multiplier",
    "latent_mask",
}


class Api:
    def __init__(self, app=None, queue_lock=None):
        """The script part of ``Api.__init__``: when a runner has no scripts yet (``--nowebui``: ``load_scripts``
        left both empty and no UI was built), build the UI's script runners now (``ui.create_ui()``, which calls
        every script's ``ui()``), then compute both tabs' default args (another ``ui()`` call per script)."""
        from modules import ui

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

    def get_scripts_list(self):
        """``/sdapi/v1/scripts``"""
        t2i = [s.name for s in scripts.scripts_txt2img.scripts if s.name is not None]
        i2i = [s.name for s in scripts.scripts_img2img.scripts if s.name is not None]
        return {"txt2img": t2i, "img2img": i2i}

    def get_script_info(self):
        """``/sdapi/v1/script-info``: each script's ``api_info`` as recorded when the UI was built."""
        res = []
        for script_list in (scripts.scripts_txt2img.scripts, scripts.scripts_img2img.scripts):
            res += [s.api_info for s in script_list if s.api_info is not None]
        return res

    def get_script(self, script_name, script_runner):
        if script_name is None or script_name == "":
            return None
        return script_runner.scripts[script_name_to_index(script_name, script_runner.scripts)]

    def get_selectable_script(self, script_name, script_runner):
        if script_name is None or script_name == "":
            return None, None
        idx = script_name_to_index(script_name, script_runner.selectable_scripts)
        return script_runner.selectable_scripts[idx], idx

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
                    values = [elem.value for elem in script.ui(script.is_img2img)]
                    script_args[script.args_from : script.args_to] = values
        return script_args

    def init_script_args(self, request, default_script_args, selectable_script, selectable_idx, script_runner):
        script_args = default_script_args.copy()
        if selectable_script:
            script_args[selectable_script.args_from : selectable_script.args_to] = request.get("script_args", [])
            script_args[0] = selectable_idx + 1
        alwayson = request.get("alwayson_scripts") or {}
        for name, entry in alwayson.items():
            script = self.get_script(name, script_runner)
            if script is None:
                raise HTTPException(status_code=422, detail=f"always on script {name} not found")
            if script.alwayson is False:
                raise HTTPException(
                    status_code=422, detail="Cannot have a selectable script in the always on scripts params"
                )
            if "args" in entry:
                for idx in range(min(script.args_to - script.args_from, len(entry["args"]))):
                    script_args[script.args_from + idx] = entry["args"][idx]
        return script_args

    def _run(self, request, runner, cls, fields, defaults_attr):
        if not getattr(self, defaults_attr):
            setattr(self, defaults_attr, self.init_default_script_args(runner))
        selectable, selectable_idx = self.get_selectable_script(request.get("script_name"), runner)
        script_args = self.init_script_args(request, getattr(self, defaults_attr), selectable, selectable_idx, runner)
        # fields the double does not model are ignored, as pydantic ignores unknown request fields
        args = {k: v for k, v in request.items() if k in fields}
        args.setdefault("sampler_name", request.get("sampler_index") or "Euler")
        if sd_samplers.find_sampler_config(args["sampler_name"]) is None:
            raise HTTPException(status_code=400, detail=f"Sampler not found: {args['sampler_name']}")
        args["do_not_save_samples"] = not request.get("save_images", False)
        args["do_not_save_grid"] = not request.get("save_images", False)
        p = cls(**args)
        p.is_api = True
        p.scripts = runner
        shared.state.begin(job="scripts_api")
        try:
            if selectable is not None:
                p.script_args = script_args
                processed = runner.run(p, *p.script_args)
            else:
                p.script_args = tuple(script_args)
                processed = processing.process_images(p)
        finally:
            shared.state.end()
        images = list(map(encode_pil_to_base64, processed.images)) if request.get("send_images", True) else []
        return {"images": images, "parameters": dict(request), "info": processed.js(), "processed": processed}

    def text2imgapi(self, request: dict):
        return self._run(
            dict(request),
            scripts.scripts_txt2img,
            processing.StableDiffusionProcessingTxt2Img,
            _TXT2IMG_FIELDS,
            "default_script_arg_txt2img",
        )

    def img2imgapi(self, request: dict):
        request = dict(request)
        if request.get("init_images") is None:
            raise HTTPException(status_code=404, detail="Init image not found")
        request["init_images"] = [
            decode_base64_to_image(x) if isinstance(x, str) else x for x in request["init_images"]
        ]
        if request.get("mask"):
            mask = request["mask"]
            request["mask"] = decode_base64_to_image(mask) if isinstance(mask, str) else mask
        return self._run(
            request,
            scripts.scripts_img2img,
            processing.StableDiffusionProcessingImg2Img,
            _IMG2IMG_FIELDS,
            "default_script_arg_img2img",
        )


def info_json(processed) -> dict:
    return json.loads(processed.js())
