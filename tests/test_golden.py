"""Regression: a fixed set of generations on both doubles gives bit-identical outputs to the recorded ones.

Every method, batch 2, hires fix, img2img, SD1 and SDXL, on the A1111 and the Forge double.  The hashes in
``tests/golden/hashes.json`` were recorded with the code of the commit that added this file (before the methods
moved behind one interface); any change of a method's numerics shows up here as a changed hash.

Float results can differ between CPUs (other SIMD kernels), so the file holds one recording per kind of machine,
each with the hashes of plain generations (extension off) on both doubles: a run compares against the recording
whose plain hashes this machine reproduces, and skips, saying so, where none does (record one for this kind of
machine, from a commit whose outputs are trusted, with ``ATTN_UPDATE_GOLDEN=1 bash tests/run.sh
tests/test_golden.py``; the same command re-records this machine's recording after a change meant to alter outputs).
A case added after a recording was made skips on that kind of machine until it is recorded there.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import pathlib

import gradio
import pytest
import torch
from PIL import Image

from tests.fakes.a1111_double import a1111_host
from tests.fakes.forge_env import forge_host

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "attention_toolkit.py"
GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "hashes.json"
PHOTOS = pathlib.Path(gradio.__file__).parent / "test_data"
UPDATE = os.environ.get("ATTN_UPDATE_GOLDEN") == "1"

T2I = dict(prompt="a cat on a table", negative_prompt="blurry", seed=7, steps=4, cfg_scale=5.0, width=96, height=80)
I2I = dict(T2I, denoising_strength=0.6)
HIRES = dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=3, hr_upscaler="Latent")


def _photo(name: str, size: tuple[int, int] = (96, 80)) -> Image.Image:
    return Image.open(PHOTOS / name).convert("RGB").resize(size)


def _b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _cases():
    """name -> (host kind, model, call, kwargs, named args or None for off)."""
    ref, style_ref = _b64(_photo("cheetah1.jpg")), _b64(_photo("lion.jpg"))
    gray = _photo("cheetah1.jpg").convert("L").convert("RGB")
    init = _photo("lion.jpg")
    pag = {"pag": {"scale": 3.0}}
    return {
        "plain_txt2img": ("sd1", "txt2img", dict(T2I, batch_size=2), None),
        "plain_img2img": ("sd1", "img2img", dict(I2I, init_images=[init]), None),
        "pag_batch2_hires": ("sd1", "txt2img", dict(T2I, batch_size=2, **HIRES), pag),
        "pag_hires_own_ddim": (
            "sd1",
            "txt2img",
            dict(T2I, sampler_name="DDIM", **HIRES),
            {"pag": {"scale": 2.0, "hires": "own", "hires_scale": 5.0, "layers": "middle,output.4"}},
        ),
        "pag_sdxl_batch2": ("sdxl", "txt2img", dict(T2I, batch_size=2), pag),
        "pag_img2img_adaptive": (
            "sd1",
            "img2img",
            dict(I2I, init_images=[init]),
            {"pag": {"adaptive_scale": 0.002, "start": 0.2}},
        ),
        "colorize_batch2": (
            "sd1",
            "img2img",
            dict(I2I, init_images=[gray], batch_size=2, cfg_scale=2.0),
            {"colorize": {"reference": ref, "guidance": 5.0}},
        ),
        "colorize_pag_full_streams": (
            "sd1",
            "img2img",
            dict(I2I, init_images=[gray], cfg_scale=1.0, negative_prompt=""),
            {"colorize": {"reference": ref, "reference_scale": 1.0}, **pag},
        ),
        "style_txt2img_hires": (
            "sd1",
            "txt2img",
            dict(T2I, **HIRES),
            {"style": {"reference": style_ref, "hires": "own", "hires_strength": 0.05}},
        ),
        "style_img2img_batch2_pag": (
            "sd1",
            "img2img",
            dict(I2I, init_images=[init], batch_size=2),
            {"style": {"reference": style_ref, "iters": 2}, **pag},
        ),
        "style_sdxl": ("sdxl", "txt2img", dict(T2I), {"style": {"reference": style_ref}}),
        "edit_mask_batch2": (
            "sd1",
            "img2img",
            dict(I2I, init_images=[init], batch_size=2, prompt="a cat on a table"),
            {"edit_mask": {"words": "cat", "show": True}},
        ),
        "edit_mask_inpaint_pag": (
            "sd1",
            "img2img",
            dict(I2I, init_images=[init], prompt="a cat on a table"),
            {"edit_mask": {"words": "cat", "final": "inpaint"}, **pag},
        ),
        "yoda_img2img_batch2": (
            "sd1",
            "img2img",
            dict(I2I, init_images=[init], batch_size=2),
            {"yoda": {"source": "unet", "show": True}},
        ),
        "yoda_hires_pag": (
            "sd1",
            "txt2img",
            dict(T2I, batch_size=2, **HIRES),
            {"yoda": {"source": "unet", "blur": 0}, **pag},
        ),
        "guidance_cfg_stage_tpg_swg": (
            "sd1",
            "txt2img",
            dict(T2I, batch_size=2, width=128, height=128),
            {"apg": {"momentum": -0.5}, "fdg": {"low_share": 0.4}, "cfg_zero": {"zero_steps": 1},
             "ag": {"threshold": 0.95}, "tpg": {"scale": 2.0}, "swg": {"scale": 3.0}, "nag": {"scale": 3.0}},
        ),
        "yoda_edit_mask_sdxl": (
            "sdxl",
            "img2img",
            dict(I2I, init_images=[init]),
            {"yoda": {"source": "unet"}, "edit_mask": {"words": "cat"}},
        ),
    }


def _digest(processed) -> str:
    h = hashlib.sha256()
    for img in processed.images:
        h.update(repr((img.mode, img.size)).encode())
        h.update(img.tobytes())
    samples = getattr(processed, "samples", None)
    if samples is not None:
        for s in samples:
            if isinstance(s, torch.Tensor):
                h.update(s.detach().float().contiguous().numpy().tobytes())
    for text in getattr(processed, "infotexts", None) or []:
        h.update(text.encode())
    return h.hexdigest()[:20]


def _run(host: str, kind: str, call: str, kwargs: dict, named) -> str:
    torch.manual_seed(0)
    enter = a1111_host if host == "a1111" else forge_host
    with enter(kind) as h:
        h.load_script(SCRIPT)
        kw = dict(kwargs)
        if host == "forge" and kw.get("enable_hr"):
            kw["hr_additional_modules"] = ["Use same choices"]
        args = [named] if named is not None else None
        fn = h.txt2img if call == "txt2img" else h.img2img
        return _digest(fn(script_args=args, **kw))


def _recordings() -> list[dict]:
    data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    return data.get("recordings", [data] if data else [])


CASES = _cases()


@functools.cache
def _plain(host: str, name: str) -> str:
    return _run(host, *CASES[name])


def _this_machine(recordings: list[dict]) -> dict | None:
    """The recording whose plain generations this machine reproduces on both doubles."""
    for rec in recordings:
        if all(_plain(h, p) == rec.get(f"{h}/{p}") for h in ("a1111", "forge") for p in PLAIN):
            return rec
    return None


PLAIN = ("plain_txt2img", "plain_img2img")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread: reductions then run in one order, whatever the machine's core count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("host", ["a1111", "forge"])
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_are_bit_identical_to_the_recording(host, name):
    kind, call, kwargs, named = CASES[name]
    got = _run(host, kind, call, kwargs, named)
    key = f"{host}/{name}"
    recordings = _recordings()
    rec = _this_machine(recordings)
    if UPDATE:
        if rec is None:
            rec = {f"{h}/{p}": _plain(h, p) for h in ("a1111", "forge") for p in PLAIN}
            recordings.append(rec)
        rec[key] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        ordered = [dict(sorted(r.items())) for r in recordings]
        GOLDEN.write_text(json.dumps({"recordings": ordered}, indent=1) + "\n")
        return
    if rec is None:
        pytest.skip("no recording made on a machine whose plain generations match this one's (other float kernels); "
                    "record one with ATTN_UPDATE_GOLDEN=1")
    if key not in rec:
        pytest.skip(f"{key} was added after this kind of machine's recording; record it with ATTN_UPDATE_GOLDEN=1")
    assert got == rec[key], f"{key}: output changed"
