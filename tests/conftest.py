"""Test setup: the repo root on sys.path, the real k-diffusion samplers importable, fixed seeds."""

from __future__ import annotations

import os
import pathlib
import sys

# as the WebUI does before it imports gradio (modules/launch_utils.py): no analytics or version-check threads
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download (DINO models are saved locally by the tests)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.kdiff import load_k_diffusion  # noqa: E402

load_k_diffusion()

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
