"""Double of modules/api/api.py: image decoding as A1111 does it, and the alwayson_scripts handling of
/sdapi/v1/txt2img and /sdapi/v1/img2img (defaults from ui(), title matched case-insensitively)."""

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


def init_script_args(request: dict, default_script_args, runner):
    script_args = list(default_script_args)
    for name, body in (request.get("alwayson_scripts") or {}).items():
        script = get_script(name, runner)
        if not script.alwayson:
            raise HTTPException(status_code=422, detail="Cannot have a selectable script in the always on scripts params")
        args = body.get("args", []) if isinstance(body, dict) else []
        for i in range(min(len(args), script.args_to - script.args_from)):
            script_args[script.args_from + i] = args[i]
    return script_args
