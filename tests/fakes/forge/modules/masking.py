"""``modules.masking`` (simplified: ``fill`` paints the masked area with the mean unmasked colour)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def get_crop_region_v2(mask, pad=0):
    box = mask.getbbox() if isinstance(mask, Image.Image) else Image.fromarray(mask).getbbox()
    if not box:
        return None
    x1, y1, x2, y2 = box
    w, h = mask.size
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, w), min(y2 + pad, h)


def expand_crop_region(crop_region, processing_width, processing_height, image_width, image_height):
    x1, y1, x2, y2 = crop_region
    ratio_crop = (x2 - x1) / (y2 - y1)
    ratio_processing = processing_width / processing_height
    if ratio_crop > ratio_processing:
        desired = (x2 - x1) / ratio_processing
        diff = int(desired - (y2 - y1))
        y1 -= diff // 2
        y2 += diff - diff // 2
        if y2 >= image_height:
            y1 -= y2 - image_height
            y2 = image_height
        if y1 < 0:
            y2 -= y1
            y1 = 0
        y2 = min(y2, image_height)
    else:
        desired = (y2 - y1) * ratio_processing
        diff = int(desired - (x2 - x1))
        x1 -= diff // 2
        x2 += diff - diff // 2
        if x2 >= image_width:
            x1 -= x2 - image_width
            x2 = image_width
        if x1 < 0:
            x2 -= x1
            x1 = 0
        x2 = min(x2, image_width)
    return x1, y1, x2, y2


def fill(image, mask):
    arr = np.array(image.convert("RGB"), dtype=np.float32)
    m = np.array(mask.convert("L").resize(image.size), dtype=np.float32)[..., None] / 255.0
    keep = 1.0 - m
    mean = (arr * keep).sum((0, 1)) / max(float(keep.sum()), 1.0)
    out = arr * keep + mean[None, None, :] * m
    return Image.fromarray(out.clip(0, 255).astype(np.uint8)).convert("RGBA")
