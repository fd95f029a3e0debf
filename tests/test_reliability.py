"""Reliability beyond the soak: model switches (refiner mid-sampling, a checkpoint change between generations) on
both doubles, no network at run time, and a soak on the Forge double."""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import socket

import pytest
import torch
from PIL import Image

from lib_attn import settings as S
from tests.fakes.a1111_double import a1111_host
from tests.fakes.forge_env import forge_host
from tests.support.helpers import SCRIPT, assert_no_leftovers
from tests.support.images import photo, small

BASE = dict(prompt="a red cube", negative_prompt="", seed=3, steps=4, cfg_scale=5.0, width=96, height=80,
            sampler_name="Euler")


def all_methods_txt2img():
    return [{"pag": {"scale": 2.0}, "style": {"reference": photo("lion.jpg"), "iters": 1}}]


@contextlib.contextmanager
def patched_modules():
    """Every module that gets one of our forward wrappers, as it is installed."""
    registry = importlib.import_module("lib_attn.registry")
    seen = []
    original = registry.PatchSet.wrap_forward

    def wrap_forward(self, module, fn):
        seen.append(module)
        return original(self, module, fn)

    registry.PatchSet.wrap_forward = wrap_forward
    try:
        yield seen
    finally:
        registry.PatchSet.wrap_forward = original


def modules_of(model):
    return {id(m) for m in model.model.diffusion_model.modules()}


def clean(model):
    for m in model.model.diffusion_model.modules():
        assert "forward" not in m.__dict__ and not m._forward_pre_hooks and not m._forward_hooks


# ---------------------------------------------------------------------------------------------
# model switches
# ---------------------------------------------------------------------------------------------
def test_refiner_switch_mid_sampling_moves_every_patch():
    from tests.support.tiny import make_sd_model

    with a1111_host("sd1", models={"refiner": lambda: make_sd_model("sd1", seed=8)}) as h, patched_modules() as seen:
        h.load_script(SCRIPT)
        base_model = h.modules.shared.sd_model
        out = h.txt2img(**BASE, refiner_checkpoint="refiner", refiner_switch_at=0.5, script_args=all_methods_txt2img())
        refiner = h.modules.shared.sd_model
        assert refiner is not base_model
        assert not h.errors and out.samples is not None
        on_base = [m for m in seen if id(m) in modules_of(base_model)]
        on_refiner = [m for m in seen if id(m) in modules_of(refiner)]
        assert on_base and on_refiner  # the patches followed the switch to the refiner's own modules
        assert len(on_base) + len(on_refiner) == len(seen)
        clean(base_model), clean(refiner)
        assert h.callback_count() == 0


def test_checkpoint_change_between_generations_a1111():
    from tests.support.tiny import make_sd_model

    models = {"other": lambda: make_sd_model("sd1", seed=5)}
    with a1111_host("sd1", models=models) as h, patched_modules() as seen:
        h.load_script(SCRIPT)
        first = h.modules.shared.sd_model
        h.txt2img(**BASE, script_args=all_methods_txt2img())
        sd_models = h.modules.sd_models
        sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match("other"))
        second = h.modules.shared.sd_model
        assert second is not first
        seen.clear()
        after_switch = h.txt2img(**BASE, script_args=all_methods_txt2img()).samples
        assert seen and all(id(m) in modules_of(second) for m in seen)  # nothing points at the old model
        clean(first), clean(second)
    with a1111_host("sd1", models=models) as fresh:
        fresh.load_script(SCRIPT)
        sd_models = fresh.modules.sd_models
        sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match("other"))
        assert torch.equal(fresh.txt2img(**BASE, script_args=all_methods_txt2img()).samples, after_switch)


def test_checkpoint_change_between_generations_forge():
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        first = h.sd_model.forge_objects.unet.model.diffusion_model
        h.txt2img(**BASE, script_args=all_methods_txt2img())
        h.load_checkpoint("tiny-sd2.safetensors")
        second = h.sd_model.forge_objects.unet.model.diffusion_model
        assert second is not first
        out = h.txt2img(**{**BASE, "width": 128, "height": 128}, script_args=all_methods_txt2img())
        assert not h.errors and out.samples is not None
        for unet in (first, second):
            assert all("forward" not in m.__dict__ for m in unet.modules())
        assert h.callback_count() == 0


# ---------------------------------------------------------------------------------------------
# no network
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_network():
    """Every way out of the process through ``socket`` raises and is counted."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access during a test")

    saved = (socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo)
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    try:
        yield attempts
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo = saved


def test_no_network_at_run_time():
    import base64
    import io

    def b64(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    ref = b64(photo("lion.jpg").resize((64, 64)))
    with a1111_host("sd1") as h, no_network() as attempts:
        h.load_script(SCRIPT)
        payload = {**BASE, "alwayson_scripts": {"Attention Toolkit": {"args": [
            {"pag": {"scale": 2.0}, "style": {"reference": ref, "iters": 1}}]}}}
        status, _ = h.api_txt2img(payload)
        assert status == 200
        i2i = {**BASE, "init_images": [b64(small("cheetah1.jpg"))], "denoising_strength": 0.5,
               "alwayson_scripts": {"Attention Toolkit": {"args": [{"colorize": {"reference": ref}}]}}}
        status, _ = h.api_img2img(i2i)
        assert status == 200
        # a URL in the arguments is refused by name, never fetched
        url = {**i2i, "alwayson_scripts": {"Attention Toolkit": {"args": [
            {"colorize": {"reference": "http://127.0.0.1:9/x.png"}}]}}}
        status, resp = h.api_img2img(url)
        assert status == 500 and "URLs and file paths are not accepted" in resp["errors"]
        assert_no_leftovers(h)
    assert attempts == []


# ---------------------------------------------------------------------------------------------
# soak on the Forge double
# ---------------------------------------------------------------------------------------------
FORGE_COUNT = int(os.environ.get("ATTN_SOAK_FORGE", "12"))


def fault_at_call(unet, at: int):
    """A forward pre-hook that raises ``RuntimeError("injected")`` at the ``at``-th UNet call; returns its handle and
    a function that says whether it has raised (a generation with fewer UNet calls never reaches it)."""
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] == at:
            raise RuntimeError("injected")

    return unet.register_forward_pre_hook(boom), lambda: calls["n"] >= at


def test_soak_on_the_forge_double():
    """Random PAG / style / colorization settings, batch sizes, odd sizes, samplers, hires (with Forge's hr_cfg 1
    sometimes), exceptions inside the UNet and interrupts; after each generation nothing of ours is left on the
    UNet or in the callbacks, and at the end a reference generation equals a fresh host's."""
    reference = dict(BASE, script_args=[{"pag": {"scale": 2.0}}])
    with forge_host("sd1") as fresh:
        fresh.load_script(SCRIPT)
        expected = fresh.txt2img(**reference).samples
    rng = random.Random(77)
    lion = photo("lion.jpg").resize((64, 64))
    failures = interrupts = 0
    with forge_host("sd1", inference_weights=True) as h:
        h.load_script(SCRIPT)
        unet = h.sd_model.forge_objects.unet.model.diffusion_model
        state = h.modules.shared.state
        for i in range(FORGE_COUNT):
            named: dict = {}
            if rng.random() < 0.7:
                named["pag"] = {"scale": rng.choice([0.0, 2.0]), "layers": rng.choice(["middle", "output.9"]),
                                "hires": rng.choice(S.HIRES_MODES)}
            if rng.random() < 0.5:
                named["style"] = {"reference": lion, "iters": 1, "strength": rng.choice([0.05, 0.2]),
                                  "adain": rng.random() < 0.5, "hires": rng.choice(S.HIRES_MODES)}
            kw = dict(BASE, seed=i, width=rng.choice([64, 72, 96]), height=rng.choice([64, 80]),
                      batch_size=rng.choice([1, 2]), steps=rng.choice([2, 3]),
                      sampler_name=rng.choice(["Euler", "Euler a", "DPM++ 2M"]), script_args=[named] if named else None)
            img2img = rng.random() < 0.3
            if img2img:
                named["colorize"] = {"reference": lion, "guidance": rng.choice([1.0, 10.0])}
                named.pop("style", None) if rng.random() < 0.5 else None
                kw.update(script_args=[named], denoising_strength=0.6, init_images=[small("cheetah1.jpg")])
            elif rng.random() < 0.3:
                kw.update(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5,
                          hr_cfg=rng.choice([1.0, 3.0]))
            fault = 0.05 if i % 6 == 2 else 0.15 if i % 6 == 4 else 1.0
            handle = fired = None
            raised = False
            if fault < 0.1:
                handle, fired = fault_at_call(unet, rng.randint(1, 4))
            elif fault < 0.2:
                at = rng.randint(0, 1)

                def interrupt(params, at=at):
                    nonlocal interrupts
                    if params.sampling_step == at:
                        state.interrupted = True
                        interrupts += 1

                h.modules.script_callbacks.on_cfg_denoiser(interrupt)
            try:
                h.img2img(**kw) if img2img else h.txt2img(**kw)
            except RuntimeError as e:
                assert "injected" in str(e)
                failures += 1
                raised = True
            finally:
                if handle is not None:
                    handle.remove()
                if fault < 0.2 and fault >= 0.1:
                    h.modules.script_callbacks.remove_callbacks_for_function(interrupt)
                state.interrupted = False
            # a fault that fired surfaced as the generation's error (nothing swallowed it), and only then did it fail
            assert raised == (fired is not None and fired()), (i, raised)
            assert all("forward" not in m.__dict__ and not m._forward_pre_hooks for m in unet.modules())
            assert h.callback_count() == 0
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        again = h.txt2img(**reference).samples
    assert torch.equal(again, expected)
    if FORGE_COUNT >= 6:  # both kinds of fault really happened: an exception inside the UNet and an interrupt
        assert failures > 0 and interrupts > 0, (failures, interrupts)


@pytest.mark.parametrize("kind", ["sd1"])
def test_forge_interrupt_inside_a_style_step_leaves_weights_as_inference_tensors(kind):
    with forge_host(kind, inference_weights=True) as h:
        h.load_script(SCRIPT)
        state = h.modules.shared.state

        def interrupt(params):
            if params.sampling_step == 1:
                state.interrupted = True

        h.modules.script_callbacks.on_cfg_denoiser(interrupt)
        try:
            h.txt2img(**BASE, script_args=[{"style": {"reference": Image.new("RGB", (32, 32), (9, 99, 199))}}])
        finally:
            h.modules.script_callbacks.remove_callbacks_for_function(interrupt)
            state.interrupted = False
        unet = h.sd_model.forge_objects.unet.model.diffusion_model
        assert all(p.is_inference() for p in unet.parameters())
        assert h.callback_count() == 0
