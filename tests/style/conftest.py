"""The style tests' tiny UNet (float64, random weights, the real ldm classes)."""

from __future__ import annotations

import pytest
import torch

from tests.support.tiny import install_size_fix, make_unet


@pytest.fixture(scope="module")
def unet64():
    install_size_fix()
    unet = make_unet("sd1", seed=4).double().eval().requires_grad_(False)
    unet.dtype = torch.float64  # ldm casts its input to unet.dtype
    return unet
