"""Real photos (the gradio package's test data) and image measures shared by the tests."""

from __future__ import annotations

import math
import pathlib

import gradio
import numpy as np
from PIL import Image

from lib_attn import color

PHOTOS = pathlib.Path(gradio.__file__).parent / "test_data"


def photo(name: str) -> Image.Image:
    return Image.open(PHOTOS / name).convert("RGB")


def small(name, size=(96, 80)):
    return photo(name).resize(size)


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def lightness(img: Image.Image) -> np.ndarray:
    return color.rgb_to_lab(color.pil_to_tensor(img))[0].numpy()
