"""Soak: many generations with random PAG, SEG, SAG, NAG, reference-colorization, style-reference and edit-mask settings, batch sizes, sizes, samplers, hires on/off, exceptions
injected inside the UNet and interrupts at random steps, on the A1111 double.  After every generation nothing of
ours is left on the model or in the callback lists; afterwards a reference generation equals a fresh host's, and
the process's memory has not grown.

``ATTN_SOAK`` sets the count (default 25, which CI runs); ``ATTN_SOAK=1000 bash tests/run.sh tests/test_soak.py``
is the long run.
"""

from __future__ import annotations

import os
import random

import torch

from lib_attn import settings as S
from tests.fakes.a1111_double import a1111_host
from tests.support.helpers import SCRIPT

COUNT = int(os.environ.get("ATTN_SOAK", "25"))
REFERENCE = dict(prompt="a lighthouse", negative_prompt="fog", seed=9, steps=3, cfg_scale=6.0, width=96, height=80,
                 sampler_name="Euler a", batch_size=2,
                 script_args=S.defaults().with_values({"pag_enabled": True, "pag_scale": 2.0}).to_args())


def rss_mb() -> float:
    """Resident memory after a collection and ``malloc_trim`` (freed heap given back), so what is measured is
    what is still held, not the allocator's cache of freed blocks of many shapes."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def random_settings(rng: random.Random) -> list:
    start = rng.choice([0.0, 0.0, 0.3])
    values = {
        "pag_enabled": rng.random() < 0.8,
        "pag_scale": rng.choice([0.0, 1.0, 3.0, 5.5]),
        "pag_adaptive_scale": rng.choice([0.0, 0.0, 0.002]),
        "pag_start": start,
        "pag_end": rng.choice([1.0, max(start, 0.6)]),
        "pag_layers": rng.choice(["middle", "input.4, output.4", "all", "output"]),
        "pag_hires": rng.choice(S.HIRES_MODES),
        "pag_hires_scale": rng.choice([0.0, 2.0]),
    }
    if rng.random() < 0.25:
        values.update({f"style_{k}": v for k, v in random_style(rng).items()}, style_enabled=True)
    values.update(random_guidance(rng))
    return S.defaults().with_values(values).to_args()


def random_guidance(rng: random.Random) -> dict:
    """SEG, SAG and NAG, each on about a third of the time."""
    values = {}
    if rng.random() < 0.35:
        values.update(seg_enabled=True, seg_scale=rng.choice([0.0, 2.0]), seg_blur_sigma=rng.choice([1.0, 10000.0]),
                      seg_layers=rng.choice(["middle", "input.4, output.4"]), seg_hires=rng.choice(S.HIRES_MODES))
    if rng.random() < 0.35:
        values.update(sag_enabled=True, sag_scale=rng.choice([0.0, 0.75]), sag_threshold=rng.choice([0.5, 1.0]),
                      sag_start=rng.choice([0.0, 0.5]), sag_hires=rng.choice(S.HIRES_MODES))
    if rng.random() < 0.35:
        values.update(nag_enabled=True, nag_scale=rng.choice([1.0, 5.0]), nag_alpha=rng.choice([0.25, 1.0]),
                      nag_end=rng.choice([0.5, 1.0]), nag_hires=rng.choice(S.HIRES_MODES))
    return values


def random_style(rng: random.Random) -> dict:
    from PIL import Image

    ref = Image.new("RGB", (rng.choice([48, 64]), 56), tuple(rng.randrange(256) for _ in "rgb"))
    return {"reference": ref, "strength": rng.choice([0.05, 0.2]), "iters": 1, "adain": rng.random() < 0.5,
            "layers": rng.choice(["auto", "output.9", "middle"]), "checkpointing": rng.choice(["auto", "on"]),
            "start": rng.choice([0.0, 0.5]), "hires": rng.choice(S.HIRES_MODES)}


def random_colorize(rng: random.Random, batch: int) -> dict:
    from PIL import Image

    def img(seed):
        r = random.Random(seed)
        return Image.new("RGB", (r.choice([40, 64, 90]), r.choice([40, 64, 77])), tuple(r.randrange(256) for _ in "rgb"))

    refs = [img(rng.random()) for _ in range(batch if rng.random() < 0.3 else 1)]
    start = rng.choice([0.0, 0.4])
    return {"colorize": {"reference": refs, "strength": rng.choice([1.0, 0.5]), "guidance": rng.choice([1.0, 10.0]),
                         "start": start, "end": rng.choice([1.0, max(start, 0.7)]),
                         "layers": rng.choice(["auto", "output.9, output.11", "middle"]),
                         "adain": rng.random() < 0.5, "match_colors": rng.random() < 0.5}}


def fail_at_call(unet, at: int):
    """A forward pre-hook that raises ``RuntimeError("injected")`` at the ``at``-th UNet call; returns its handle."""
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] == at:
            raise RuntimeError("injected")

    return unet.register_forward_pre_hook(boom)


def assert_clean(h):
    unet = h.modules.shared.sd_model.model.diffusion_model
    for name, m in unet.named_modules():
        assert "forward" not in m.__dict__, name
        assert not m._forward_pre_hooks and not m._forward_hooks, name
    assert h.callback_count() == 0


def test_soak_random_generations():
    with a1111_host("sd1") as fresh:
        fresh.load_script(SCRIPT)
        expected = fresh.txt2img(**REFERENCE).samples

    rng = random.Random(1234)
    failures = interrupts = 0
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        torch.manual_seed(0)
        h.txt2img(**REFERENCE)
        # first uses that import libraries once (torch's checkpoint pulls in sympy and mpmath, ~75 MB) are not growth
        warm_all = S.defaults().with_values({
            "seg_enabled": True, "sag_enabled": True, "nag_enabled": True, "style_enabled": True,
            **{f"style_{k}": v for k, v in random_style(random.Random(0)).items()}, "style_checkpointing": "on"})
        h.txt2img(**{**REFERENCE, "script_args": warm_all.to_args()})
        # memory is measured from the end of a warm-up (a third of the run): the first generations of each new
        # shape fill torch's and the allocator's caches (the WebUI alone grows ~40 MB that way, then stays flat)
        warm = max(1, min(COUNT // 3, 40))
        rss0 = rss_mb()
        unet = h.modules.shared.sd_model.model.diffusion_model
        for i in range(COUNT):
            size = rng.choice([(64, 64), (72, 56), (96, 80), (128, 96)])
            kw = dict(prompt=rng.choice(["a cat", "a cat AND a hat:0.7", "[a cat:a dog:0.5]"]), negative_prompt="",
                      seed=i, steps=rng.choice([2, 3]), cfg_scale=rng.choice([1.0, 5.0]), width=size[0],
                      height=size[1], batch_size=rng.choice([1, 2]),
                      sampler_name=rng.choice(["Euler", "Euler a", "DPM++ 2M", "Heun", "DDIM"]),
                      script_args=random_settings(rng))
            h.modules.shared.opts.batch_cond_uncond = rng.random() < 0.7
            if rng.random() < 0.3:
                kw.update(enable_hr=True, hr_scale=1.5, hr_upscaler=rng.choice(["Latent", "Lanczos"]),
                          denoising_strength=0.5)
                if rng.random() < 0.5:  # masked upscaling in the hires pass (UNet source: no extra model)
                    args = S.from_args(kw["script_args"]).with_values({
                        "yoda_enabled": True, "yoda_source": "unet", "yoda_start_coverage": rng.choice([0.1, 0.5]),
                        "yoda_growth": rng.choice([0.5, 1.0, 2.0]), "yoda_blur": rng.choice([0, 8]),
                        "yoda_show": rng.random() < 0.3})
                    kw["script_args"] = args.to_args()
            fault = rng.random()
            fault = 0.05 if i % 8 == 3 else 0.15 if i % 8 == 6 else fault  # every kind of fault comes up
            handle = None
            if fault < 0.1:
                handle = fail_at_call(unet, rng.randint(1, 4))
            elif fault < 0.2:
                h.modules.shared.state.interrupt_at_step = rng.randint(1, 2)
                interrupts += 1
            try:
                if rng.random() < 0.3:  # img2img with reference colorization (and maybe PAG)
                    from PIL import Image

                    named = random_colorize(rng, kw["batch_size"])
                    if rng.random() < 0.5:
                        named["pag"] = {"scale": 2.0}
                    if rng.random() < 0.2:
                        named["style"] = random_style(rng)
                    if rng.random() < 0.4:
                        named["edit_mask"] = {"threshold": rng.choice([0.2, 0.5]), "grow": rng.choice([0, 8]),
                                              "blur": rng.choice([0, 4]), "batch_average": rng.random() < 0.3,
                                              "layers": rng.choice(["auto", "output.3"])}
                        if rng.random() < 0.5:
                            named.pop("colorize")
                    if rng.random() < 0.3:
                        named["yoda"] = {"source": "unet", "start_coverage": rng.choice([0.2, 0.6])}
                    kw.pop("enable_hr", None), kw.pop("hr_scale", None), kw.pop("hr_upscaler", None)
                    kw.update(script_args=[named], denoising_strength=0.6,
                              init_images=[Image.new("RGB", (rng.choice([64, 100]), 80), (90, 90, 90))])
                    h.img2img(**kw)
                else:
                    h.txt2img(**kw)
            except RuntimeError as e:
                assert "injected" in str(e)
                failures += 1
            finally:
                if handle is not None:
                    handle.remove()
                h.modules.shared.state.reset()
            assert_clean(h)
            if i + 1 == warm:
                rss0 = rss_mb()
            if os.environ.get("ATTN_SOAK_TRACE") and i % 10 == 0:
                print(f"soak {i}: RSS {rss_mb() - rss0:+.1f} MB")
        h.modules.shared.opts.batch_cond_uncond = True
        again = h.txt2img(**REFERENCE).samples
        growth = rss_mb() - rss0
    assert torch.equal(again, expected), "state carried over from earlier generations"
    assert growth < 50, f"RSS grew by {growth:.1f} MB over {COUNT} generations"
    if COUNT >= 20:
        assert failures > 0 and interrupts > 0  # the faults were really exercised
