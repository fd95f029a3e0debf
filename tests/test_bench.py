"""The cost benchmark (``bench/cost.py``): its peak-memory measure sees an allocation, and the command runs methods
against their baselines in child processes and prints its ratio lines.  Figures are not judged here (timings are
benchmarks, not tests); only that they are measured and printed."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import re
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cost():
    spec = importlib.util.spec_from_file_location("bench_cost", ROOT / "bench" / "cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_peak_memory_sees_what_a_run_allocates():
    cost = _cost()

    def allocate():
        t = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        return float(t.sum())

    _, peak, before = cost.peak_memory(allocate, torch.device("cpu"))
    assert peak - before >= 60
    # After a run of many tensors the C allocator's heap holds freed memory that is still resident (a test
    # suite's or a build's leftovers); an allocation that reused it would not raise the resident size.
    held = [torch.ones(2**20 // 4) for _ in range(300)]
    last = held[-1]  # keeps the heap's top in place: the 299 freed megabytes cannot shrink away by themselves
    del held[:-1]
    _, peak, before = cost.peak_memory(allocate, torch.device("cpu"))
    assert peak - before >= 60
    del last
    _, peak, before = cost.peak_memory(lambda: None, torch.device("cpu"))
    assert peak - before < 30  # the mark was reset: the earlier run's peak does not show


def test_the_command_runs_methods_against_their_baselines():
    cmd = [sys.executable, str(ROOT / "bench" / "cost.py"), "--methods", "pag,nag,edit_mask", "--steps", "1",
           "--threads", "1"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ratios = dict(re.findall(r"^ratio (\S+) (\S+)$", done.stdout, flags=re.M))
    for name in ("pag_vs_cfg_step", "nag_vs_cfg_step", "edit_mask_vs_img2img"):
        assert math.isfinite(float(ratios[name])) and float(ratios[name]) > 0, done.stdout
    for m in ("pag", "nag", "edit_mask"):
        assert float(ratios[f"{m}_peak_memory_vs_plain"]) > 0
    assert re.search(r"^weights \d+ MB", done.stdout, flags=re.M)
    bad = subprocess.run([*cmd[:2], "--methods", "nope"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "--methods: unknown nope" in bad.stderr
