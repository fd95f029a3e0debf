"""Reference images from the UI and the API, checked before anything runs.

``load_image`` takes what a gradio Image control gives (a PIL image, a numpy array, a dict with an
``image``/``background``/``composite`` entry), or what the API gives (a base64 string or a
``data:image/...;base64,`` URL), and returns an 8-bit RGB PIL image, or raises a
:class:`~lib_attn.settings.SettingsError` naming the field.  URLs and file paths are refused: the
extension never fetches or opens what an API caller names.

Limits: at most ``MAX_PIXELS`` pixels (checked from the header, before the pixels are decoded, so a
decompression bomb costs nothing) and ``MAX_BYTES`` of encoded data.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from lib_attn.settings import Field

MAX_PIXELS = 64 * 1024 * 1024  # 8192 x 8192
MAX_BYTES = 200 * 1024 * 1024
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


def load_image(field: Field, value: Any) -> Image.Image | None:
    """8-bit RGB image from a UI or API value; None when ``value`` is empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, Mapping):
        for key in ("composite", "image", "background"):
            if value.get(key) is not None:
                return load_image(field, value[key])
        return None
    if isinstance(value, Image.Image):
        return _to_rgb(field, value)
    if isinstance(value, np.ndarray):
        return _to_rgb(field, _from_array(field, value))
    if isinstance(value, (bytes, bytearray)):
        return _decode(field, bytes(value))
    if isinstance(value, str):
        return _decode(field, _b64(field, value))
    raise field.error(f"expected an image (base64 PNG/JPEG or data URL), got {type(value).__name__}")


def _b64(field: Field, text: str) -> bytes:
    s = text.strip()
    if re.match(r"^[a-z][a-z0-9+.-]*://", s, re.I) or s.lower().startswith("file:"):
        raise field.error("URLs and file paths are not accepted; send the image itself as base64")
    s = _DATA_URL.sub("", s, count=1)
    if len(s) > MAX_BYTES * 4 // 3 + 4:
        raise field.error(f"the image data is larger than {MAX_BYTES // (1024 * 1024)} MB")
    try:
        return base64.b64decode(re.sub(r"\s+", "", s), validate=True)
    except (binascii.Error, ValueError):
        # base64 of a JPEG starts with "/9j/", so a leading "/" alone does not make a path
        if s.startswith(("/", "./", "../", "~")) or re.match(r"^[a-z]:\\", s, re.I):
            raise field.error("URLs and file paths are not accepted; send the image itself as base64") from None
        raise field.error("not valid base64 image data") from None


def _decode(field: Field, data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise field.error("the data is not an image PIL can read (PNG, JPEG, WebP, ...)") from None
    except Exception as e:
        raise field.error(f"the image could not be opened: {e}") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise field.error(f"the image is {w}x{h}, more than the {MAX_PIXELS // (1024 * 1024)} megapixel limit")
    try:
        img.load()
    except Exception as e:  # truncated or corrupt data
        raise field.error(f"the image data is broken or truncated ({e})") from None
    return _to_rgb(field, img)


def _from_array(field: Field, a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise field.error(f"expected an HxW, HxWx3 or HxWx4 image array, got shape {tuple(a.shape)}")
    if a.dtype != np.uint8:
        a = np.asarray(a, dtype=np.float64)
        top = 65535.0 if a.max(initial=0) > 255 else (255.0 if a.max(initial=0) > 1 else 1.0)
        a = np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def _to_rgb(field: Field, img: Image.Image) -> Image.Image:
    w, h = img.size
    if w < 8 or h < 8:
        raise field.error(f"the image is {w}x{h}; it must be at least 8x8")
    if w * h > MAX_PIXELS:
        raise field.error(f"the image is {w}x{h}, more than the {MAX_PIXELS // (1024 * 1024)} megapixel limit")
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8))
    elif mode == "F":
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(a * (255.0 if a.max(initial=0) <= 1 else 1.0)), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")
