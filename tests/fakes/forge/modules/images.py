"""``modules.images`` (resize, grid, flatten)."""

from __future__ import annotations

import math

from PIL import Image

_RESAMPLE = {None: Image.LANCZOS, "None": Image.LANCZOS, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}


def resize_image(resize_mode, im, width, height, upscaler_name=None, force_RGBA=False):
    """0: just resize; 1: crop and resize; 2: resize and fill."""
    resample = _RESAMPLE.get(upscaler_name, Image.LANCZOS)
    if resize_mode == 0 or im.size == (width, height):
        return im.resize((width, height), resample=resample)
    ratio, src_ratio = width / height, im.width / im.height
    if resize_mode == 1:
        w = width if ratio > src_ratio else im.width * height // im.height
        h = height if ratio <= src_ratio else im.height * width // im.width
        resized = im.resize((w, h), resample=resample)
        res = Image.new("RGB" if not force_RGBA else "RGBA", (width, height))
        res.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
        return res
    w = width if ratio < src_ratio else im.width * height // im.height
    h = height if ratio >= src_ratio else im.height * width // im.width
    resized = im.resize((w, h), resample=resample)
    res = Image.new("RGB" if not force_RGBA else "RGBA", (width, height))
    res.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
    return res


def image_grid(imgs, batch_size=1, rows=None):
    if rows is None:
        rows = max(1, round(math.sqrt(len(imgs))))
    cols = math.ceil(len(imgs) / rows)
    w, h = imgs[0].size
    grid = Image.new("RGB", size=(cols * w, rows * h), color="black")
    for i, img in enumerate(imgs):
        grid.paste(img, box=(i % cols * w, i // cols * h))
    return grid


def flatten(img, bgcolor):
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, bgcolor)
        background.paste(img, mask=img)
        img = background
    return img.convert("RGB")


def save_image(*args, **kwargs):
    return None, None
