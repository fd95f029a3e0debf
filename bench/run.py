"""Benchmarks: cost of each method against plain sampling, measured in the same run.

    .venv/bin/python bench/run.py pag|seg|sag|nag|tpg|swg|apg|cfg_zero|fdg|ag|colorize|style|edit_mask|masked_upscale
        [--size tiny|sd15] [--steps N] [--repeat R] [--batch B] [--profile]

``pag`` times the sampling loop (every denoiser step, nothing else) of the A1111 double on a random-weight
ldm UNet, with CFG only and with CFG + PAG (batched rows), interleaving the two so drift hits both, and prints
the median per-step times (wall clock, and this process's CPU time, which a busy shared machine disturbs less)
and, as its last line, ``ratio pag_vs_cfg_step <value>`` (wall clock).  ``seg`` and ``sag`` do the same for SEG
(``ratio seg_vs_cfg_step``) and SAG (``ratio sag_vs_cfg_step``) at CFG 5, ``nag`` for NAG at CFG 1 against a
plain CFG-1 step (``ratio nag_vs_cfg_step``); ``tpg`` and ``swg`` at CFG 5; ``apg``, ``cfg_zero``, ``fdg`` and ``ag``
(the CFG stage) at CFG 7.  ``pag``, ``seg``, ``tpg`` and ``sag`` also time bare UNet calls on B, 2B and 3B rows and
print ``ratio unet_3b_rows_vs_2b_rows`` and ``ratio one_extra_b_row_call_vs_cfg_step``: the least a step with B more
rows in its call (PAG, SEG, TPG), or with one B-row call of its own (SAG), can cost on this hardware.  ``--profile`` adds torch.profiler's table of one step, plain and with the method.  ``--size sd15`` builds
a full-size SD1.5 UNet (860M parameters, fp32 on the CPU, 512x512 -> 64x64 latent); expect minutes.

Every method's time and peak memory in one command, one child process per run: ``bench/cost.py``.

``colorize`` times whole img2img generations with reference colorization against plain img2img (same steps,
CFG 1, interleaved) and prints ``ratio colorize_vs_img2img <value>`` last.

``style`` times the sampling loop per step, plain (CFG) against style-guided steps with 1 (the default), 2 and 3
inner iterations, and the peak resident memory of each run above the process's level before it (Linux
``VmHWM``, reset between runs); ``ratio style_vs_plain_guided_step <value>`` (default settings) is last.
``--checkpointing on|off|auto`` picks the gradient checkpointing of the guided pass.

``edit_mask`` times whole img2img generations with the automatic edit mask against plain img2img (CFG 5,
interleaved): ``ratio edit_mask_vs_img2img``; the time the mask itself takes (its hooks timed inside the run)
against a DiffEdit mask (10 noisings x 2 prompts in one batched UNet call, diffusers' defaults) on the same
model: ``ratio diffedit_mask_vs_instant_mask``; and whole edits, DiffEdit's mask then the same img2img, against
ours: ``ratio diffedit_edit_vs_instant_edit`` (a lower bound for DiffEdit, which also inverts the image).

``masked_upscale`` times whole txt2img + hires-fix generations with masked upscaling (DINO source: a full-size
ViT-S/8 with random weights, saved into a temporary models folder) against the same without, interleaved:
``ratio masked_upscale_vs_hires``.  Use ``--size sd15`` (a full-size SD1.5 UNet: 256 -> 512 px): with the tiny UNet
the DINO forward dwarfs the sampling and the ratio says nothing about a real model.

``rows`` times bare UNet calls on B, 2B and 3B rows alone (``--size sdxl`` too): the hardware's floors above.

``style_memory`` counts, on the ``meta`` device (nothing allocated, seconds), the activations the guided pass keeps
for its backward with full-size SD1.5 (512²) and SDXL (1024²) UNets in fp16, with and without checkpointing.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from cost import dino_folder, peak_memory  # noqa: E402  (bench/cost.py, beside this file)

import tests.conftest  # noqa: E402,F401  (loads k-diffusion the way the tests do)
from lib_attn import settings as S  # noqa: E402
from tests.fakes.a1111_double import a1111_host  # noqa: E402
from tests.support.helpers import SCRIPT  # noqa: E402
from tests.support.images import photo  # noqa: E402

SIZES = {
    # name: (model kind passed to the double, latent-space image size in pixels)
    "tiny": ("sd1", 256),
    "tiny1024": ("sd1", 1024),  # the tiny UNet on a large latent: activations, not weights, make the peak
    "sd15": ("sd15", 512),
    "sdxl": ("sdxl_full", 1024),  # rows only: the full-size SDXL UNet
}


def _timed_sampling(h):
    """Wrap the double's txt2img sampling (class level, under the extension's own wrapper) with a timer."""
    cls = h.modules.processing.StableDiffusionProcessingTxt2Img
    original = cls.sample
    times: list[tuple[float, float]] = []  # (wall, process CPU) seconds per sampling call

    def sample(self, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            times.append((time.perf_counter() - t0, time.process_time() - c0))

    cls.sample = sample
    return times, lambda: setattr(cls, "sample", original)


# the guidance methods timed per step against plain sampling: settings switched on, and the CFG scale of both runs
# (NAG is measured where it matters most, at CFG 1, against a plain CFG-1 step)
GUIDANCE = {
    "pag": ({"pag_enabled": True, "pag_scale": 3.0}, 5.0),
    "seg": ({"seg_enabled": True, "seg_scale": 3.0}, 5.0),
    "sag": ({"sag_enabled": True, "sag_scale": 0.75}, 5.0),
    "nag": ({"nag_enabled": True, "nag_scale": 5.0}, 1.0),
    # the CFG stage: no extra pass (AG saves the uncond pass once the predictions agree)
    "apg": ({"apg_enabled": True}, 7.0),
    "cfg_zero": ({"cfg_zero_enabled": True}, 7.0),
    "fdg": ({"fdg_enabled": True}, 7.0),
    "ag": ({"ag_enabled": True}, 7.0),
    "tpg": ({"tpg_enabled": True, "tpg_scale": 3.0}, 5.0),
    "swg": ({"swg_enabled": True, "swg_scale": 5.0}, 5.0),
}


def _guidance_setup(args: argparse.Namespace) -> tuple[dict, float, str, int, dict]:
    """No grad, the thread count asked for; the method's settings, its CFG scale, the model kind, the image size and
    the txt2img arguments (without ``steps``) of a guidance benchmark."""
    values, cfg = GUIDANCE[args.method]
    kind, size = SIZES[args.size]
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = dict(
        prompt="a photo of a cat",
        negative_prompt="blurry",
        seed=1,
        cfg_scale=cfg,
        width=size,
        height=size,
        batch_size=args.batch,
        sampler_name="Euler",
    )
    return values, cfg, kind, size, base


def bench_guidance(args: argparse.Namespace) -> float:
    name = args.method
    values, cfg, kind, size, base = _guidance_setup(args)
    base["steps"] = args.steps
    with a1111_host(kind) as h:
        h.load_script(SCRIPT)
        times, restore = _timed_sampling(h)
        off = S.defaults().to_args()
        on = S.defaults().with_values(values).to_args()
        try:
            h.txt2img(**base, script_args=on)  # warm-up
            h.txt2img(**base, script_args=off)
            cfg_t, on_t = [], []
            for _ in range(args.repeat):
                h.txt2img(**base, script_args=off)
                cfg_t.append(times[-1])
                h.txt2img(**base, script_args=on)
                on_t.append(times[-1])
            floors = _row_floors(h, args, size) if name in ("pag", "seg", "tpg", "sag") else None
        finally:
            restore()
    print(
        f"size {args.size} ({size}px, batch {args.batch}, CFG {cfg:g}, {args.steps} steps x {args.repeat} runs, "
        f"torch threads {torch.get_num_threads()}, attention: sdp as the WebUI's default optimization)"
    )
    ratios = {}
    for i, clock in enumerate(("wall", "cpu")):
        cfg_s = statistics.median(t[i] for t in cfg_t) / args.steps
        on_s = statistics.median(t[i] for t in on_t) / args.steps
        ratios[clock] = on_s / cfg_s
        print(f"{clock:4s} step cfg {cfg_s * 1000:8.2f} ms   step cfg+{name} {on_s * 1000:8.2f} ms")
    print(f"ratio {name}_vs_cfg_step_cpu {ratios['cpu']:.3f}")
    if floors is not None:
        b = args.batch
        print(
            "bare UNet call: "
            + ", ".join(f"{n} rows {v * 1000:.1f} ms" for n, v in floors.items())
            + " (the least a step with B more rows in its call, or one B-row call of its own, can cost):"
        )
        print(f"ratio unet_3b_rows_vs_2b_rows {floors[3 * b] / floors[2 * b]:.3f}")
        print(f"ratio one_extra_b_row_call_vs_cfg_step {1 + floors[b] / floors[2 * b]:.3f}")
    _rule_cost(name)
    if args.profile:
        _profile(args)
    print(f"ratio {name}_vs_cfg_step {ratios['wall']:.3f}")
    return ratios["wall"]


def _profile(args: argparse.Namespace) -> None:
    """torch.profiler's table (operators by their own CPU time) of one sampling step, plain and with the method,
    after a warm-up step of each: where the method's extra time goes."""
    from torch.profiler import ProfilerActivity, profile

    values, cfg, kind, _, base = _guidance_setup(args)
    with a1111_host(kind) as h:
        h.load_script(SCRIPT)
        for label, script_args in (
            ("plain", S.defaults().to_args()),
            (args.method, S.defaults().with_values(values).to_args()),
        ):
            h.txt2img(**base, steps=1, script_args=script_args)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                h.txt2img(**base, steps=1, script_args=script_args)
            print(f"\none step, {label} (CFG {cfg:g}, {args.size}):")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def _row_floors(h, args: argparse.Namespace, size: int) -> dict[int, float]:
    """Median seconds of one bare UNet call (``sd_model.apply_model``, no extension hook) on B, 2B (a CFG call's)
    and 3B rows, interleaved.  PAG, SEG and TPG put B more rows into the step's call: ``t(3B) / t(2B)`` is the least
    their step can cost against a plain one on this hardware.  SAG's extra input depends on the step's own output, so
    it runs a B-row call of its own after it: at least ``1 + t(B) / t(2B)``."""
    model = h.modules.shared.sd_model
    b = args.batch
    side = size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * b, 4, side, side, generator=g).to(model.dtype)
    c = model.get_learned_conditioning(["a photo of a cat"] * (2 * b) + ["blurry"] * b)
    t = torch.full((3 * b,), 500.0)
    timed: dict[int, list[float]] = {b: [], 2 * b: [], 3 * b: []}
    for _ in range(args.repeat + 1):
        for n in timed:
            cond = {k: v[:n] for k, v in c.items()} if isinstance(c, dict) else {"c_crossattn": [c[:n]]}  # SDXL: dict
            t0 = time.perf_counter()
            model.apply_model(x[:n], t[:n], cond)
            timed[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v[1:]) for n, v in timed.items()}  # the first round warms up


def bench_rows(args: argparse.Namespace) -> float:
    """Bare UNet calls on B, 2B and 3B rows (no extension): the floors of :func:`_row_floors` alone, at any size
    (``--size sdxl``: the full-size SDXL UNet at 1024²)."""
    kind, size = _setup(args)
    with a1111_host(kind) as h:
        floors = _row_floors(h, args, size)
    b = args.batch
    print(
        f"size {args.size} ({size}px, B = {args.batch}, {args.repeat} runs after a warm-up, torch threads {torch.get_num_threads()})"
    )
    print("bare UNet call: " + ", ".join(f"{n} rows {v * 1000:.1f} ms" for n, v in floors.items()))
    print(f"ratio one_extra_b_row_call_vs_cfg_step {1 + floors[b] / floors[2 * b]:.3f}")
    print(f"ratio unet_3b_rows_vs_2b_rows {floors[3 * b] / floors[2 * b]:.3f}")
    return floors[3 * b] / floors[2 * b]


def _rule_cost(name: str) -> None:
    """The CFG-stage rule alone on SD1.5 (64x64) and SDXL (128x128) latents, batch 1, fp32, this process's threads:
    what the method adds to a step beyond the host's own CFG, without the noise of whole-step timings."""
    from lib_attn.cfg import plain_cfg
    from lib_attn.methods.ag.core import similarity
    from lib_attn.methods.apg.core import ApgPlan, apg
    from lib_attn.methods.cfg_zero.core import scaled_uncond
    from lib_attn.methods.fdg.core import FdgPlan, fdg

    rules = {
        "apg": lambda x, c, u: apg(c, u, 7.0, ApgPlan(0.0, 15.0, -0.5, 0, 1), c - u)[0],
        "cfg_zero": lambda x, c, u: plain_cfg(c, scaled_uncond(x, c, u), 7.0),
        "fdg": lambda x, c, u: fdg(c, u, FdgPlan(2, 0.5, (), 0, 1).scales(7.0), plain_cfg),
        "ag": lambda x, c, u: similarity(x, c, u, "denoised"),
    }
    if name not in rules:
        return
    for side in (64, 128):
        g = torch.Generator().manual_seed(0)
        x, c, u = (torch.randn(1, 4, side, side, generator=g) for _ in range(3))
        for _ in range(5):
            rules[name](x, c, u)
        t = []
        for _ in range(50):
            t0 = time.perf_counter()
            rules[name](x, c, u)
            t.append(time.perf_counter() - t0)
        plain = []
        for _ in range(50):
            t0 = time.perf_counter()
            plain_cfg(c, u, 7.0)
            plain.append(time.perf_counter() - t0)
        print(
            f"rule {name} on a {side}x{side} latent: {statistics.median(t) * 1000:.3f} ms "
            f"(plain CFG's combination {statistics.median(plain) * 1000:.3f} ms)"
        )


def _setup(args: argparse.Namespace) -> tuple[str, int]:
    """No grad, the thread count asked for; the model kind and image size of ``--size``."""
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    return SIZES[args.size]


def _img2img_ratio(args: argparse.Namespace, name: str, init, on: list, note: str, **extra) -> float:
    """Whole img2img generations (encode, sampling, decode, post-processing) with the script args ``on`` against
    plain img2img with the same steps, interleaved; prints ``ratio <name>_vs_img2img`` (wall clock, and ``_cpu``)."""
    kind, size = _setup(args)
    with a1111_host(kind) as h:
        h.load_script(SCRIPT)
        off = S.defaults().to_args()
        base = dict(
            prompt="",
            negative_prompt="",
            seed=1,
            steps=args.steps,
            cfg_scale=1.0,
            width=size,
            height=size,
            batch_size=args.batch,
            sampler_name="Euler",
            denoising_strength=1.0,
            init_images=[init.resize((size, size))],
        )
        base.update(extra)

        def timed(script_args):
            t0, c0 = time.perf_counter(), time.process_time()
            h.img2img(**base, script_args=script_args)
            return time.perf_counter() - t0, time.process_time() - c0

        timed(on)  # warm-up
        timed(off)
        plain_t, on_t = [], []
        for _ in range(args.repeat):
            plain_t.append(timed(off))
            on_t.append(timed(on))
    print(
        f"size {args.size} ({size}px, batch {args.batch}, {base['steps']} steps x {args.repeat} runs, "
        f"CFG {base['cfg_scale']:g}, torch threads {torch.get_num_threads()}; {note})"
    )
    ratios = {}
    for i, clock in enumerate(("wall", "cpu")):
        a = statistics.median(t[i] for t in plain_t)
        b = statistics.median(t[i] for t in on_t)
        ratios[clock] = b / a
        print(f"{clock:4s} img2img {a * 1000:8.1f} ms   img2img+{name} {b * 1000:8.1f} ms")
    print(f"ratio {name}_vs_img2img_cpu {ratios['cpu']:.3f}")
    print(f"ratio {name}_vs_img2img {ratios['wall']:.3f}")
    return ratios["wall"]


def bench_colorize(args: argparse.Namespace) -> float:
    """Reference colorization against plain img2img (CFG 1, empty prompt, the defaults)."""
    init = photo("cheetah1.jpg").convert("L").convert("RGB")
    on = [{"colorize": {"reference": photo("lion.jpg")}}]
    note = (
        "guidance 10, empty prompt: the uncond rows are the plain rows, the reference streams at the default half side"
    )
    return _img2img_ratio(args, "colorize", init, on, note)


def bench_colorize_paper(args: argparse.Namespace) -> float:
    """Reference colorization in the paper's regime (3 inversions, 3 passes of 5 steps, 2 re-inversions) against
    a plain 20-step img2img at strength 0.5 (10 steps), CFG 1, empty prompt."""
    init = photo("cheetah1.jpg").convert("L").convert("RGB")
    on = [{"colorize": {"reference": photo("lion.jpg"), "paper": True}}]
    note = "paper's regime, 3 passes; plain: 20 steps at strength 0.5"
    return _img2img_ratio(args, "colorize_paper", init, on, note, steps=20, denoising_strength=0.5)


def bench_style_transfer(args: argparse.Namespace) -> float:
    """The paper's style transfer by optimization (style mode transfer, one Adam step per step) against plain
    img2img with the same steps, CFG 5 (the host's cond and uncond rows run at every step; the uncond rows are the
    optimization's forward on A1111)."""
    on = [{"style": {"reference": photo("cheetah1.jpg"), "mode": "transfer"}}]
    note = "transfer lr 0.05, content weight 0.25, its forward on the host's uncond rows"
    return _img2img_ratio(args, "style_transfer", photo("lion.jpg"), on, note, cfg_scale=5.0)


def _time_into(spent: dict, bucket: str, owner: object, name: str):
    """Wrap ``owner.name`` so that the seconds spent inside it add to ``spent[bucket]``; returns the unwrapper."""
    original = getattr(owner, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            spent[bucket] += time.perf_counter() - t0

    setattr(owner, name, wrapper)
    return lambda: setattr(owner, name, original)


def bench_edit_mask(args: argparse.Namespace) -> float:
    kind, size = _setup(args)
    init = photo("cheetah1.jpg").resize((size, size))
    prompt = "a photo of a tiger"
    spent = {"mask": 0.0}  # seconds inside the mask's own code (capture, maps, mask, blends)

    with a1111_host(kind) as h:
        h.load_script(SCRIPT)
        from lib_attn.methods.edit_mask import core as em
        from lib_attn.methods.edit_mask import run as edit_mask_io  # the modules the loaded script uses

        off, on = S.defaults().to_args(), [{"edit_mask": {}}]
        base = dict(
            prompt=prompt,
            negative_prompt="",
            seed=1,
            steps=args.steps,
            cfg_scale=5.0,
            width=size,
            height=size,
            batch_size=args.batch,
            sampler_name="Euler",
            denoising_strength=0.5,
            init_images=[init],
        )
        model = h.modules.shared.sd_model
        restores = [_time_into(spent, "mask", em, "cross_attention_probs"), _time_into(spent, "mask", em.MapSum, "add")]
        restores += [
            _time_into(spent, "mask", edit_mask_io.EditMaskRun, n) for n in ("update", "blend_input", "blend_denoised")
        ]

        def generation(script_args):
            spent["mask"] = 0.0
            t0 = time.perf_counter()
            h.img2img(**base, script_args=script_args)
            return time.perf_counter() - t0, spent["mask"]

        z0 = model.get_first_stage_encoding(model.encode_first_stage(torch.rand(args.batch, 3, size, size) * 2 - 1))
        conds = model.get_learned_conditioning([prompt, ""])
        t_mid = torch.tensor(500.0)

        def eps(x, sigma, how):
            target, source, n = how
            c = torch.cat([target.expand(n, -1, -1), source.expand(n, -1, -1)])
            return model.apply_model(x, t_mid.expand(x.shape[0]), {"c_crossattn": [c]})

        def diffedit():
            t0 = time.perf_counter()
            em.diffedit_mask(eps, z0, 1.0, conds[:1], conds[1:], samples=10)
            return time.perf_counter() - t0

        try:
            generation(on), generation(off), diffedit()  # warm-up
            plain_t, edit_t, mask_t, diff_t = [], [], [], []
            for _ in range(args.repeat):
                plain_t.append(generation(off)[0])
                t, m = generation(on)
                edit_t.append(t)
                mask_t.append(m)
                diff_t.append(diffedit())
        finally:
            for r in restores:
                r()
    med = statistics.median
    plain, edit, mask, diff = med(plain_t), med(edit_t), med(mask_t), med(diff_t)
    print(
        f"size {args.size} ({size}px, batch {args.batch}, {args.steps} steps at strength 0.5 x {args.repeat} runs, "
        f"CFG 5, torch threads {torch.get_num_threads()})"
    )
    print(
        f"img2img {plain * 1000:8.1f} ms   with edit mask {edit * 1000:8.1f} ms   of which the mask's own code "
        f"{mask * 1000:7.1f} ms   DiffEdit mask (2x10 rows) {diff * 1000:8.1f} ms"
    )
    print(f"ratio diffedit_mask_vs_instant_mask {diff / mask:.3f}")
    print(f"ratio diffedit_edit_vs_instant_edit {(diff + plain) / edit:.3f}")
    print(f"ratio edit_mask_vs_img2img {edit / plain:.3f}")
    return edit / plain


def bench_masked_upscale(args: argparse.Namespace) -> float:
    """Whole txt2img generations with hires fix (first pass at half size, hires pass x2, denoising 0.5), with masked
    upscaling from DINO against the same without, interleaved.  The DINO model is a full-size ViT-S/8
    (``facebook/dino-vits8``'s configuration, random weights) saved into a temporary models folder, so its forward
    costs what the real one does; the time inside DINO and inside the run's own code is reported too."""
    import tempfile

    kind, size = _setup(args)
    spent = {"dino": 0.0, "run": 0.0}

    with tempfile.TemporaryDirectory() as models, a1111_host(kind) as h:
        dino_folder(pathlib.Path(models))
        h.load_script(SCRIPT)
        from modules import paths

        from lib_attn.methods.yoda import dino
        from lib_attn.methods.yoda import run as yoda_io

        paths.models_path = models
        restores = [_time_into(spent, "dino", dino, "attention_map")]
        restores += [
            _time_into(spent, "run", yoda_io.YodaRun, n)
            for n in ("start_pass", "mask_for", "blend_input", "blend_denoised", "add_unet")
        ]
        off, on = S.defaults().to_args(), [{"yoda": {"source": "dino-vits8"}}]
        half = size // 2
        base = dict(
            prompt="a photo of a cat",
            negative_prompt="",
            seed=1,
            steps=args.steps,
            cfg_scale=5.0,
            width=half,
            height=half,
            batch_size=args.batch,
            sampler_name="Euler",
            enable_hr=True,
            hr_scale=2.0,
            hr_upscaler="Latent",
            denoising_strength=0.5,
        )

        def generation(script_args):
            spent.update(dino=0.0, run=0.0)
            t0, c0 = time.perf_counter(), time.process_time()
            h.txt2img(**base, script_args=script_args)
            return time.perf_counter() - t0, time.process_time() - c0, spent["dino"], spent["run"] - spent["dino"]

        try:
            generation(on), generation(off)  # warm-up (loads the model once)
            plain_t, yoda_t = [], []
            for _ in range(args.repeat):
                plain_t.append(generation(off))
                yoda_t.append(generation(on))
        finally:
            for r in restores:
                r()
    med = statistics.median
    print(
        f"size {args.size} ({half}px -> hires {size}px, batch {args.batch}, {args.steps} steps per pass at hires "
        f"denoising 0.5 x {args.repeat} runs, CFG 5, torch threads {torch.get_num_threads()}; DINO ViT-S/8 full size)"
    )
    ratios = {}
    for i, clock in enumerate(("wall", "cpu")):
        a, b = med(t[i] for t in plain_t), med(t[i] for t in yoda_t)
        ratios[clock] = b / a
        print(f"{clock:4s} txt2img+hires {a * 1000:9.1f} ms   with masked upscaling {b * 1000:9.1f} ms")
    print(
        f"of which DINO {med(t[2] for t in yoda_t) * 1000:.1f} ms, the run's other code "
        f"{med(t[3] for t in yoda_t) * 1000:.1f} ms"
    )
    print(f"ratio masked_upscale_vs_hires_cpu {ratios['cpu']:.3f}")
    print(f"ratio masked_upscale_vs_hires {ratios['wall']:.3f}")
    return ratios["wall"]


def bench_style(args: argparse.Namespace) -> float:
    kind, size = _setup(args)
    ref = photo("lion.jpg")
    default_iters = S.FIELD_BY_KEY["style_iters"].default
    variants = {"plain": S.defaults().to_args()}
    for n in sorted({1, default_iters, 3}):
        variants[f"style iters {n}"] = [{"style": {"reference": ref, "iters": n, "checkpointing": args.checkpointing}}]
    with a1111_host(kind) as h:
        h.load_script(SCRIPT)
        times, restore = _timed_sampling(h)
        base = dict(
            prompt="a photo of a cat",
            negative_prompt="",
            seed=1,
            steps=args.steps,
            cfg_scale=5.0,
            width=size,
            height=size,
            batch_size=args.batch,
            sampler_name="Euler",
        )
        got: dict[str, list] = {k: [] for k in variants}
        peaks: dict[str, float] = {}
        try:
            for script_args in variants.values():  # warm-up
                h.txt2img(**base, script_args=script_args)
            for name, script_args in variants.items():  # peak memory, one run each
                _, peak, before = peak_memory(
                    lambda a=script_args: h.txt2img(**base, script_args=a), torch.device("cpu")
                )
                peaks[name] = peak - before
            for _ in range(args.repeat):
                for name, script_args in variants.items():
                    h.txt2img(**base, script_args=script_args)
                    got[name].append(times[-1])
        finally:
            restore()
    print(
        f"size {args.size} ({size}px, batch {args.batch}, {args.steps} steps x {args.repeat} runs, CFG 5, "
        f"torch threads {torch.get_num_threads()}, checkpointing {args.checkpointing}; fp32 on the CPU)"
    )
    plain = statistics.median(t[0] for t in got["plain"]) / args.steps
    ratio = float("nan")
    for name in variants:
        step = statistics.median(t[0] for t in got[name]) / args.steps
        print(
            f"{name:15s} step {step * 1000:9.2f} ms   x{step / plain:6.2f}   peak RSS above start {peaks[name]:8.1f} MB"
        )
        if name == f"style iters {default_iters}":
            ratio = step / plain
    for name in variants:
        if name != "plain":
            step = statistics.median(t[0] for t in got[name]) / args.steps
            print(f"ratio {name.replace(' ', '_')}_vs_plain_step {step / plain:.3f}")
    print(f"ratio style_vs_plain_guided_step {ratio:.3f}")
    return ratio


def _meta_unet(kind: str):
    """A full-size UNet (``sd15`` or ``sdxl_full``, the tests' configurations) on the ``meta`` device in fp16 (shapes
    only, nothing allocated)."""
    from tests.support import tiny

    unet = tiny.make_unet(kind, meta=True).half()
    unet.dtype = torch.float16
    return unet


def bench_style_memory(args: argparse.Namespace) -> float:
    """What the guided pass keeps for its backward, per image, counted exactly on the ``meta`` device: every tensor
    autograd saves (deduplicated by storage, weights excluded) during one guided forward of a full-size UNet in
    fp16 at its native size, and, with gradient checkpointing, the block inputs that stay plus the largest block's
    saved tensors (what one recomputation holds)."""
    total = 0.0
    for kind, side, ctx_dim in (("sd15", 64, 768), ("sdxl_full", 128, 2048)):
        total += _guided_pass_saved_bytes(kind, side, ctx_dim)
    return total


def _guided_pass_saved_bytes(kind: str, side: int, ctx_dim: int) -> float:
    from lib_attn.methods.colorize import core as colorize
    from lib_attn.methods.style import core as style
    from lib_attn.registry import PatchSet
    from lib_attn.session import layer_keys

    unet = _meta_unet(kind)
    weights = {p.untyped_storage()._cdata for p in unet.parameters()}
    n_params = sum(p.numel() for p in unet.parameters())
    with torch.device("meta"):
        x = torch.randn(1, 4, side, side, dtype=torch.float16)
        t = torch.full((1,), 500.0)
        ctx = torch.randn(1, 77, ctx_dim, dtype=torch.float16)
        y = torch.randn(1, 2816, dtype=torch.float16) if kind == "sdxl_full" else None
    keys = layer_keys(unet)
    layers = [k.module_path for k in keys if k.attn == "attn1" and k.block == "output"]
    chosen = colorize.default_selector(keys).replace(" ", "").split(",")
    layers = [p for p in layers if p.split(".")[1] in {c.split(".")[1] for c in chosen}]
    rec = style.Recorder()
    saved: dict[int, int] = {}
    per_block: list[int] = []
    inputs: list[int] = []

    def pack(tensor):
        sid = tensor.untyped_storage()._cdata
        if sid not in weights:
            saved[sid] = max(saved.get(sid, 0), tensor.untyped_storage().nbytes())
        return tensor

    def pre(module, a):
        inputs.append(a[0].numel() * a[0].element_size())
        per_block.append(-sum(saved.values()))

    def post(module, a, out):
        per_block[-1] += sum(saved.values())

    with PatchSet() as ps:
        for path in layers:
            ps.wrap_forward(unet.get_submodule(path), style.self_attention_wrapper(rec, path))
        for block in style.blocks(unet):
            ps.add_handle(block.register_forward_pre_hook(pre))
            ps.add_handle(block.register_forward_hook(post))
        kw = {"y": y} if y is not None else {}
        if kind == "sdxl_full":
            ctx = [ctx] * 10  # sdkit's SpatialTransformer takes one context per transformer block
        rec.mode, rec.capture_rows = "capture", [("ref", 0)]
        with torch.no_grad():
            unet(x, t, context=ctx, **kw)
        per_block.clear(), inputs.clear()
        rec.mode, rec.ref_of = "guided", [(0,)]
        with style.grad_enabled(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            z = x.clone().requires_grad_(True)
            unet(z, t, context=ctx, **kw)
        rec.clear()
    full = sum(saved.values())
    ckpt = sum(inputs) + max(per_block)
    gib = 1024**3
    print(
        f"{kind}: {n_params / 1e9:.3f}B parameters, fp16 weights {n_params * 2 / gib:.2f} GiB; "
        f"{side * 8}x{side * 8}, style layers {', '.join(c for c in chosen)}"
    )
    print(
        f"  guided pass, per image: activations kept for backward {full / gib:.2f} GiB without "
        f"checkpointing, about {ckpt / gib:.2f} GiB with it"
    )
    return full


BENCHES = {
    **{name: bench_guidance for name in GUIDANCE},
    "colorize": bench_colorize,
    "colorize_paper": bench_colorize_paper,
    "style": bench_style,
    "style_transfer": bench_style_transfer,
    "style_memory": bench_style_memory,
    "rows": bench_rows,
    "edit_mask": bench_edit_mask,
    "masked_upscale": bench_masked_upscale,
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=sorted(BENCHES))
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto", help="style: checkpointing")
    ap.add_argument("--profile", action="store_true", help="guidance methods: torch.profiler's tables of one step")
    args = ap.parse_args(argv)
    BENCHES[args.method](args)


if __name__ == "__main__":
    main()
