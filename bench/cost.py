"""Every method's time and peak memory against plain sampling, in one command.

    .venv/bin/python bench/cost.py [--size tiny|sd15|sdxl] [--device cpu|cuda] [--dtype fp32|fp16|bf16]
        [--batch B] [--steps N] [--repeat R] [--threads T] [--methods pag,seg,...] [--json FILE]

Each method runs on the A1111 double (the WebUI's sampling stack as ``tests/`` has it: real ldm UNet with random
weights, real k-diffusion sampler, Euler) against plain sampling of the same kind, every run in a child process of
its own: it builds the model, warms up with a one-step generation of its own settings, then runs ``--steps``
denoising steps, timed, with its peak memory measured (on the CPU the peak resident memory of the process, Linux
``VmHWM`` reset just before, once the C allocator's free memory went back to the kernel; on CUDA
``torch.cuda.max_memory_allocated`` reset just before).  One process per run, so no run's peak can hide another's.
The runs of a baseline and of its methods are interleaved (``plain, m1, m2, ...`` ``--repeat`` times), so drift hits
them alike; times are medians, peaks the lowest of the repeats.

Baselines (a method's ratio is against the baseline of its kind, in the same command):

* ``cfg_step``: txt2img, CFG 5 (NAG: CFG 1), the sampling loop timed, per step;
* ``img2img``: whole img2img generations at denoising 0.5 (``2 * steps`` steps), CFG 5 (colorization: CFG 1 with
  the empty prompt, its intended use);
* ``hires``: whole txt2img generations with hires fix (half size, then x2 at denoising 0.5), CFG 5.

Printed per method: ``ratio <method>_vs_<baseline> X`` (wall clock), ``ratio <method>_peak_memory_vs_plain X``
(peak of the whole process or of every CUDA allocation, weights included once) and
``ratio <method>_activation_memory_vs_plain X`` (the peak above the memory held just before the generation: the
weights and the runtime left out), then the weights' size, once.  The text encoder and VAE of the double are small
stand-ins, so the weights are the UNet's (and, for masked upscaling, the DINO ViT-S/8 it loads); every run imports
transformers first, as the WebUI does for its text encoder.

``--size sd15`` is the full-size SD1.5 UNet at 512²; ``sdxl`` the full-size SDXL UNet at 1024²; ``tiny`` the tests'
UNet at 256².  ``--device cuda --dtype fp16`` measures on a GPU.  ``colorize_paper`` (about 45 model calls) is left
out unless ``--methods`` names it.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tests.conftest  # noqa: E402,F401  (loads k-diffusion the way the tests do)
from lib_attn import settings as S  # noqa: E402
from tests.fakes.a1111_double import a1111_host  # noqa: E402
from tests.support.helpers import SCRIPT  # noqa: E402
from tests.support.images import photo  # noqa: E402

# --size: (the double's model kind, image side in pixels)
SIZES = {"tiny": ("sd1", 256), "sd15": ("sd15", 512), "sdxl": ("sdxl_full", 1024)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A kind of generation: ``job`` txt2img (the sampling loop timed per step), img2img or hires (whole
    generations timed), and its arguments."""

    label: str
    job: str
    args: dict


BASELINES = {
    "cfg5": Baseline("cfg_step", "txt2img", dict(prompt="a photo of a cat", negative_prompt="blurry", cfg_scale=5.0)),
    "cfg1": Baseline("cfg_step", "txt2img", dict(prompt="a photo of a cat", negative_prompt="blurry", cfg_scale=1.0)),
    "img2img": Baseline("img2img", "img2img", dict(prompt="a photo of a tiger", negative_prompt="", cfg_scale=5.0)),
    "img2img_cfg1": Baseline("img2img", "img2img", dict(prompt="", negative_prompt="", cfg_scale=1.0)),
    "img2img_paper": Baseline("img2img", "img2img", dict(prompt="", negative_prompt="", cfg_scale=1.0, steps=20)),
    "hires": Baseline("hires", "hires", dict(prompt="a photo of a cat", negative_prompt="", cfg_scale=5.0)),
}


def _values(**values):
    return lambda: S.defaults().with_values(values).to_args()


def _named(**sections):
    """Script args in the API's named form; image values are test-data file names."""

    def make():
        out = {}
        for method, fields in sections.items():
            out[method] = {k: (photo(v) if isinstance(v, str) and v.endswith(".jpg") else v) for k, v in fields.items()}
        return [out]

    return make


# method -> (baseline, script args of the run with the method on); the methods' defaults, the scales of the papers
METHODS = {
    "pag": ("cfg5", _values(pag_enabled=True, pag_scale=3.0)),
    "seg": ("cfg5", _values(seg_enabled=True, seg_scale=3.0)),
    "sag": ("cfg5", _values(sag_enabled=True, sag_scale=0.75)),
    "tpg": ("cfg5", _values(tpg_enabled=True, tpg_scale=3.0)),
    "swg": ("cfg5", _values(swg_enabled=True, swg_scale=5.0)),
    "apg": ("cfg5", _values(apg_enabled=True)),
    "cfg_zero": ("cfg5", _values(cfg_zero_enabled=True)),
    "fdg": ("cfg5", _values(fdg_enabled=True)),
    "ag": ("cfg5", _values(ag_enabled=True)),
    "style": ("cfg5", _named(style={"reference": "lion.jpg"})),
    "nag": ("cfg1", _values(nag_enabled=True, nag_scale=5.0)),
    "colorize": ("img2img_cfg1", _named(colorize={"reference": "lion.jpg"})),
    "edit_mask": ("img2img", _named(edit_mask={})),
    "style_transfer": ("img2img", _named(style={"reference": "cheetah1.jpg", "mode": "transfer"})),
    "masked_upscale": ("hires", _named(yoda={"source": "dino-vits8"})),
    "colorize_paper": ("img2img_paper", _named(colorize={"reference": "lion.jpg", "paper": True})),
}
DEFAULT_METHODS = [m for m in METHODS if m != "colorize_paper"]


# ---- measuring ------------------------------------------------------------------------------------------------------
def status_mb(key: str) -> float:
    """A figure of this process's ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status (the CPU peak needs Linux)")


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs``); returns the resident memory in MB.

    Memory that the C allocator holds free but resident (freed tensors below its mmap threshold) is handed back to
    the kernel first (glibc's ``malloc_trim``): an allocation that reused it would not raise the resident size, and
    the run's peak would miss it."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing held back to hand over
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mb("VmRSS")


def peak_memory(fn, device: torch.device) -> tuple[float, float, float]:
    """Run ``fn()``: ``(seconds, peak MB, MB held just before)``.  CUDA: every allocation of the device
    (``max_memory_allocated``, reset just before); CPU: this process's resident memory (``VmHWM``, reset just
    before through ``/proc/self/clear_refs``)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = reset_peak_rss()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else status_mb("VmHWM")
    return seconds, peak, before


def dino_folder(models: pathlib.Path) -> None:
    """A full-size DINO ViT-S/8 (``facebook/dino-vits8``'s configuration, random weights) where the WebUI's models
    folder would hold the downloaded one, so that its forward costs what the real one does."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                    patch_size=8, image_size=224, qkv_bias=True)  # fmt: skip
    torch.manual_seed(0)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(models / "dino" / "dino-vits8")


def run_child(args: argparse.Namespace) -> dict:
    """One run (``--child <method>`` or ``--child plain:<baseline>``): build, warm up, one measured generation."""
    import transformers.models.clip.modeling_clip  # noqa: F401  (the WebUI imports it at start-up for its text
    # encoder; the double's text encoder is a stand-in, so a child would otherwise first import transformers where
    # a method (DINO) uses it and count its code in that method's peak)

    name = args.child
    baseline = BASELINES[name.split(":", 1)[1]] if name.startswith("plain:") else BASELINES[METHODS[name][0]]
    script_args = S.defaults().to_args() if name.startswith("plain:") else METHODS[name][1]()
    kind, side = SIZES[args.size]
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps
    base = {"seed": 1, "batch_size": args.batch, "sampler_name": "Euler", "width": side, "height": side,
            "steps": steps, **baseline.args}  # fmt: skip
    if baseline.job == "img2img":
        base.update(denoising_strength=0.5, init_images=[photo("cheetah1.jpg").resize((side, side))])
        if "steps" not in baseline.args:
            base["steps"] = 2 * steps  # strength 0.5 runs half of them
    elif baseline.job == "hires":
        base.update(width=side // 2, height=side // 2, enable_hr=True, hr_scale=2.0, hr_upscaler="Latent",
                    denoising_strength=0.5)  # fmt: skip
    with a1111_host(kind, dtype=DTYPES[args.dtype], device=device) as h:
        h.load_script(SCRIPT)
        if args.models:
            from modules import paths

            paths.models_path = args.models
        sampling: list[float] = []
        if baseline.job == "txt2img":  # the sampling loop alone, as a step's cost
            cls = h.modules.processing.StableDiffusionProcessingTxt2Img
            original = cls.sample

            def sample(self, *a, **kw):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                try:
                    return original(self, *a, **kw)
                finally:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    sampling.append(time.perf_counter() - t0)

            cls.sample = sample
        generate = h.img2img if baseline.job == "img2img" else h.txt2img
        warm = dict(base, steps=2 if baseline.job == "img2img" else 1)
        if "steps" in baseline.args:
            warm["steps"] = baseline.args["steps"]
        generate(**warm, script_args=script_args)
        sampling.clear()
        seconds, peak, before = peak_memory(lambda: generate(**base, script_args=script_args), device)
        model = h.modules.shared.sd_model
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    per = sampling[0] / steps if baseline.job == "txt2img" else seconds
    return dict(run=name, seconds=per, peak_mb=peak, before_mb=before, weights_mb=weights, steps=base["steps"])


def _spawn(args: argparse.Namespace, name: str, models: str) -> dict:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", name, "--size", args.size,
           "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--steps", str(args.steps),
           "--threads", str(args.threads), "--models", models]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"the {name} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="denoising steps per measured generation")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved runs of each method and its baseline")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"some of {', '.join(METHODS)}")
    ap.add_argument("--json", help="also write every run's figures to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return {}
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    kind, side = SIZES[args.size]
    print(
        f"size {args.size} ({kind} UNet, {side}px), device {args.device}, {args.dtype}, batch {args.batch}, "
        f"{args.steps} denoising steps per run, {args.repeat} interleaved run(s) each, torch threads "
        f"{args.threads or torch.get_num_threads()}; one child process per run",
        flush=True,
    )
    runs: dict[str, list[dict]] = {}
    groups: dict[str, list[str]] = {}
    for m in names:
        groups.setdefault(METHODS[m][0], []).append(m)
    with tempfile.TemporaryDirectory() as models:  # the WebUI's models folder of every run
        if "hires" in groups:
            dino_folder(pathlib.Path(models))
        for group, members in groups.items():
            plain = f"plain:{group}"
            for _ in range(args.repeat):
                for name in (plain, *members):
                    runs.setdefault(name, []).append(_spawn(args, name, models))
            _report(group, members, runs)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(runs, indent=1))
    return runs


def _report(group: str, members: list[str], runs: dict[str, list[dict]]) -> None:
    label = BASELINES[group].label
    plain = runs[f"plain:{group}"]
    t0 = statistics.median(r["seconds"] for r in plain)
    p0 = min(plain, key=lambda r: r["peak_mb"])
    what = "per step" if BASELINES[group].job == "txt2img" else "per generation"
    print(f"\n{group}: plain {t0 * 1000:.1f} ms {what}, peak {p0['peak_mb']:.0f} MB ({p0['before_mb']:.0f} MB before)")
    print(f"weights {p0['weights_mb']:.0f} MB (counted once in every peak)")
    for m in members:
        t = statistics.median(r["seconds"] for r in runs[m])
        p = min(runs[m], key=lambda r: r["peak_mb"])
        print(f"{m}: {t * 1000:.1f} ms {what}, peak {p['peak_mb']:.0f} MB ({p['before_mb']:.0f} MB before)")
        print(f"ratio {m}_vs_{label} {t / t0:.3f}")
        print(f"ratio {m}_peak_memory_vs_plain {p['peak_mb'] / p0['peak_mb']:.3f}")
        if p0["peak_mb"] > p0["before_mb"]:
            act = (p["peak_mb"] - p["before_mb"]) / (p0["peak_mb"] - p0["before_mb"])
            print(f"ratio {m}_activation_memory_vs_plain {act:.3f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
