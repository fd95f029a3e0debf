"""``modules.devices`` (CPU only)."""

from __future__ import annotations

import contextlib

import torch

cpu = torch.device("cpu")
device = device_interrogate = device_gfpgan = device_esrgan = device_codeformer = cpu
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
dtype_inference = torch.float32
unet_needs_upcast = False


def get_optimal_device():
    return cpu


def torch_gc():
    return None


def autocast(disable=False):
    return contextlib.nullcontext()


def without_autocast(disable=False):
    return contextlib.nullcontext()


def cond_cast_unet(x):
    return x


def cond_cast_float(x):
    return x


def test_for_nans(x, where):
    if torch.isnan(x).all():
        raise RuntimeError(f"A tensor with all NaNs was produced in {where}.")


def randn_local(seed, shape):
    from modules import rng

    return rng.randn_local(seed, shape)
