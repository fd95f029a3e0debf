"""Regenerate the README's pictures with the tests' tiny random-weight model (no real checkpoint):

    .venv/bin/python bench/make_docs_images.py

docs/colorize_tiny.jpg: grayscale input | colour reference | output of reference colorization.
docs/style_tiny.jpg: img2img content | style image | plain img2img | img2img with the style reference.
docs/edit_mask_tiny.jpg: init image | automatic edit mask | img2img with the mask (prompt "a tiger").
docs/yoda_tiny.jpg: init image (128 px) | attention map | share of the steps diffused | masked upscale to 256 px.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gradio  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import tests.conftest  # noqa: E402,F401
from lib_attn import color  # noqa: E402
from tests.fakes.a1111_double import a1111_host  # noqa: E402

PHOTOS = pathlib.Path(gradio.__file__).parent / "test_data"


def colorize_pair(out_path: pathlib.Path) -> None:
    src = Image.open(PHOTOS / "cheetah1.jpg").convert("RGB")
    gray = color.tensor_to_pil(color.luminance_only(color.pil_to_tensor(src)))
    ref = Image.open(PHOTOS / "lion.jpg").convert("RGB")
    torch.manual_seed(0)
    with a1111_host("sd1") as h:
        h.load_script(ROOT / "scripts" / "attention_toolkit.py")
        out = h.img2img(
            prompt="",
            negative_prompt="",
            seed=1,
            steps=8,
            cfg_scale=1.0,
            width=128,
            height=128,
            sampler_name="Euler",
            denoising_strength=0.5,
            init_images=[gray],
            script_args=[{"colorize": {"reference": ref}}],
        ).images[0]
    w, h_ = src.size
    sheet = Image.new("RGB", (3 * w + 16, h_), (255, 255, 255))
    for i, im in enumerate((gray, ref.resize((w, h_)), out)):
        sheet.paste(im.resize((w, h_)), (i * (w + 8), 0))
    sheet.save(out_path, quality=88)
    print("wrote", out_path)


def style_sheet(out_path: pathlib.Path) -> None:
    content = Image.open(PHOTOS / "cheetah2.jpg").convert("RGB").resize((256, 256))
    ref = Image.open(PHOTOS / "lion.jpg").convert("RGB")
    torch.manual_seed(0)
    kw = dict(
        prompt="",
        negative_prompt="",
        seed=1,
        steps=8,
        cfg_scale=3.0,
        width=128,
        height=128,
        sampler_name="Euler",
        denoising_strength=0.5,
        init_images=[content],
    )
    with a1111_host("sd1") as h:
        h.load_script(ROOT / "scripts" / "attention_toolkit.py")
        plain = h.img2img(**kw).images[0]
        styled = h.img2img(**kw, script_args=[{"style": {"reference": ref}}]).images[0]
    w = h_ = 256
    sheet = Image.new("RGB", (4 * w + 24, h_), (255, 255, 255))
    for i, im in enumerate((content, ref, plain, styled)):
        sheet.paste(im.resize((w, h_)), (i * (w + 8), 0))
    sheet.save(out_path, quality=88)
    print("wrote", out_path)


def edit_mask_sheet(out_path: pathlib.Path) -> None:
    init = Image.open(PHOTOS / "cheetah1.jpg").convert("RGB").resize((256, 256))
    torch.manual_seed(0)
    kw = dict(
        prompt="a tiger",
        negative_prompt="",
        seed=1,
        steps=10,
        cfg_scale=5.0,
        width=256,
        height=256,
        sampler_name="Euler",
        denoising_strength=0.8,
        init_images=[init],
    )
    with a1111_host("sd1") as h:
        h.load_script(ROOT / "scripts" / "attention_toolkit.py")
        res = h.img2img(**kw, script_args=[{"edit_mask": {"threshold": 0.5, "grow": 0}}])
    edited, mask = res.images[0], res.images[-1].convert("RGB")
    sheet = Image.new("RGB", (3 * 256 + 16, 256), (255, 255, 255))
    for i, im in enumerate((init, mask, edited)):
        sheet.paste(im.resize((256, 256)), (i * (256 + 8), 0))
    sheet.save(out_path, quality=88)
    print("wrote", out_path)


def yoda_sheet(out_path: pathlib.Path) -> None:
    """img2img upscale 128 -> 256 px with masked upscaling (UNet source): init | attention map | share of the steps
    each pixel was diffused | result."""
    init = Image.open(PHOTOS / "cheetah2.jpg").convert("RGB").resize((128, 128))
    torch.manual_seed(0)
    kw = dict(
        prompt="a cheetah",
        negative_prompt="",
        seed=1,
        steps=12,
        cfg_scale=5.0,
        width=256,
        height=256,
        sampler_name="Euler",
        denoising_strength=0.6,
        init_images=[init],
    )
    with a1111_host("sd1") as h:
        h.load_script(ROOT / "scripts" / "attention_toolkit.py")
        res = h.img2img(**kw, script_args=[{"yoda": {"source": "unet", "show": True, "start_coverage": 0.2}}])
    result, strip = res.images[0], res.images[-1].convert("RGB")
    half = kw["width"]  # two panels at image size with a white gap between them
    amap, share = strip.crop((0, 0, half, strip.height)), strip.crop((strip.width - half, 0, strip.width, strip.height))
    sheet = Image.new("RGB", (4 * 256 + 24, 256), (255, 255, 255))
    for i, im in enumerate((init, amap, share, result)):
        sheet.paste(im.resize((256, 256)), (i * (256 + 8), 0))
    sheet.save(out_path, quality=88)
    print("wrote", out_path)


if __name__ == "__main__":
    colorize_pair(ROOT / "docs" / "colorize_tiny.jpg")
    style_sheet(ROOT / "docs" / "style_tiny.jpg")
    edit_mask_sheet(ROOT / "docs" / "edit_mask_tiny.jpg")
    yoda_sheet(ROOT / "docs" / "yoda_tiny.jpg")
