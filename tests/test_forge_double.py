"""The Forge 2.x double (tests/fakes/forge) is faithful where the extension depends on it.

Each property below is documented Forge behaviour (host-contract.md §8): CFG and chunk batching,
attention patch dispatch and ``extra_options``, post-CFG arguments, the CFG-1 optimization, the hires pass
(``hr_cfg``, hook called twice, ``forge_objects`` reset), ``inference_mode`` and the A1111 compatibility
layer (callbacks, script hooks, API args).
"""

from __future__ import annotations

import base64
import io
import pathlib
import sys
import textwrap

import pytest
import torch

from tests.fakes.forge_env import FORGE_ROOT, forge_host

BASE = {
    "prompt": "a red cube",
    "negative_prompt": "blurry",
    "seed": 3,
    "steps": 3,
    "cfg_scale": 5.0,
    "width": 64,
    "height": 64,
    "sampler_name": "Euler",
}

PROBE = textwrap.dedent("""
    import torch
    from modules import scripts

    HOOKS = {}
    LOG = []


    class DoubleProbe(scripts.Script):
        sorting_priority = 5

        def title(self):
            return "Double Probe"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            import gradio as gr
            return [gr.Checkbox(value=False, label="Enabled"), gr.Slider(minimum=0, maximum=10, value=2.5, label="S")]

        def _call(self, name, p, *args, **kwargs):
            hr = bool(getattr(p, "is_hr_pass", False))
            inference = torch.is_inference_mode_enabled()
            unet = p.sd_model.forge_objects.unet
            LOG.append(dict(hook=name, hr=hr, inference=inference, args=args, kwargs=kwargs, unet=unet))
            fn = HOOKS.get(name)
            if fn is not None:
                fn(p, *args, **kwargs)

        def process(self, p, *args):
            self._call("process", p, *args)

        def before_hr(self, p, *args):
            self._call("before_hr", p, *args)

        def process_before_every_sampling(self, p, *args, **kwargs):
            self._call("process_before_every_sampling", p, *args, **kwargs)

        def postprocess(self, p, processed, *args):
            self._call("postprocess", p, *args)
""")


def tol(ref: torch.Tensor) -> float:
    """1e-5, relative to the latent scale (float32 noise of differently batched matmuls)."""
    return 1e-5 * max(1.0, float(ref.abs().max()))


@pytest.fixture
def probe_path(tmp_path):
    path = tmp_path / "double-probe-ext" / "scripts" / "double_probe.py"
    path.parent.mkdir(parents=True)
    path.write_text(PROBE)
    return path


@pytest.fixture
def host(probe_path):
    with forge_host("sd1") as h:
        probe = h.load_script(probe_path)
        yield h, probe


def patch_clone(p, edit):
    """What an extension does in process_before_every_sampling: patch a clone and put it back."""
    unet = p.sd_model.forge_objects.unet.clone()
    edit(unet)
    p.sd_model.forge_objects.unet = unet
    return unet


def kdiffusion_reference(batch_size, cfg, steps, seed, prompt, negative):
    """Independent CFG run: the tiny model behind k-diffusion's CompVisDenoiser (quantized timesteps, as
    Forge's predictor rounds sigma to the nearest training timestep), the real Euler sampler, and noise
    drawn per seed like the WebUI's ImageRNG."""
    import k_diffusion.external
    import k_diffusion.sampling

    from tests.support.tiny import make_sd_model

    tiny = make_sd_model("sd1", seed=0)
    den = k_diffusion.external.CompVisDenoiser(tiny, quantize=True)
    with torch.no_grad():
        c = tiny.get_learned_conditioning([prompt] * batch_size)
        u = tiny.get_learned_conditioning([negative] * batch_size)

        def model(x, sigma):
            cond = den(x, sigma, cond={"c_crossattn": [c]})
            uncond = den(x, sigma, cond={"c_crossattn": [u]})
            return uncond + (cond - uncond) * cfg

        sigmas = den.get_sigmas(steps)
        noise = torch.stack(
            [torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed + i)) for i in range(batch_size)]
        )
        return k_diffusion.sampling.sample_euler(model, noise * sigmas[0], sigmas, disable=True)


# ---- CFG, batching ----------------------------------------------------------------------------
def test_plain_txt2img_equals_direct_kdiffusion_cfg():
    with forge_host("sd1") as h:
        out = h.txt2img(**BASE, batch_size=2)
        calls = list(h.unet_calls)
    ref = kdiffusion_reference(2, 5.0, BASE["steps"], BASE["seed"], BASE["prompt"], BASE["negative_prompt"])
    assert out.samples.shape == ref.shape == (2, 4, 8, 8)
    assert (out.samples - ref).abs().max() <= tol(ref)
    # one UNet call per step with uncond and cond rows together; Forge puts the uncond chunk first
    assert [c["rows"] for c in calls] == [4] * 3
    assert all(c["cond_or_uncond"] == [1, 0] for c in calls)


def test_chunks_split_when_memory_is_short_and_and_prompts_add_chunks():
    with forge_host("sd1") as h:
        h.backend.memory_management.free_memory_bytes = 1.0  # nothing fits: one chunk per call
        h.txt2img(**{**BASE, "steps": 2})
        assert [c["cond_or_uncond"] for c in h.unet_calls] == [[1], [0]] * 2
        h.backend.memory_management.free_memory_bytes = float(1 << 40)
        h.unet_calls.clear()
        h.txt2img(**{**BASE, "steps": 1, "prompt": "a red cube AND a blue ball:0.5"})
        assert [c["cond_or_uncond"] for c in h.unet_calls] == [[1, 0, 0]]


def test_cfg1_skips_uncond_and_disable_cfg1_optimization_keeps_it(host):
    h, probe = host
    seen = []
    h.modules.script_callbacks.on_cfg_denoiser(lambda params: seen.append(params.text_uncond))
    h.txt2img(**{**BASE, "cfg_scale": 1.0}, batch_size=2)
    assert h.unet_rows == [2] * 3 and seen == [None] * 3  # uc is None when CFG == 1

    # skip_early_cond makes cond_scale 1 for the first half while uncond exists
    h.modules.shared.opts.skip_early_cond = 0.5
    h.unet_calls.clear()
    h.txt2img(**BASE, batch_size=2)
    assert h.unet_rows == [2, 2, 4]  # step/total <= 0.5 for steps 0 and 1 (total_steps 3)

    probe.HOOKS["process_before_every_sampling"] = lambda p, *a, **k: patch_clone(
        p,
        lambda u: u.set_model_sampler_post_cfg_function(lambda args: args["denoised"], disable_cfg1_optimization=True),
    )
    h.unet_calls.clear()
    h.txt2img(**BASE, batch_size=2, all_script_args=[0, True, 1.0])
    assert h.unet_rows == [4] * 3


# ---- attention patches --------------------------------------------------------------------------
def test_attn1_replace_on_middle_gets_documented_extra_options_and_its_output_is_used(host):
    h, probe = host
    records = []

    def halve(q, k, v, extra_options):
        records.append((q.shape, k.shape, v.shape, dict(extra_options)))
        return v * 0.5  # not the identity: at 64 px the tiny SD1 middle block has a single token

    plain = h.txt2img(**BASE, batch_size=2).samples
    probe.HOOKS["process_before_every_sampling"] = lambda p, *a, **k: patch_clone(
        p, lambda u: u.set_model_attn1_replace(halve, "middle", 0)
    )
    patched = h.txt2img(**BASE, batch_size=2).samples
    assert not torch.equal(plain, patched)

    unet = h.sd_model.forge_objects.unet.model.diffusion_model
    middle = [m for n, m in unet.named_modules() if n.startswith("middle_block.") and n.endswith("attn1")]
    n_before = sum(
        1 for n, m in unet.named_modules() if n.startswith("input_blocks.") and hasattr(m, "transformer_blocks")
    )
    attn = middle[0]
    heads, inner = attn.heads, attn.to_q.out_features
    assert len(records) == 3 * len(middle)  # 3 steps, once per transformer block of the middle block
    q_shape, k_shape, v_shape, extra = records[0]
    assert q_shape == k_shape == v_shape and q_shape[0] == 4 and q_shape[2] == inner
    assert extra["block"] == ("middle", 0) and extra["block_index"] == 0
    assert extra["transformer_index"] == n_before
    assert extra["original_shape"] == [4, 4, 8, 8]
    assert extra["cond_or_uncond"] == [1, 0]
    assert extra["cond_indices"] == [2, 3] and extra["uncond_indices"] == [0, 1]
    assert extra["cond_mark"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert extra["sigmas"].shape == (2,)
    assert extra["n_heads"] == heads and extra["dim_head"] == inner // heads
    assert "patches" not in extra and "patches_replace" not in extra


def test_replace_patch_output_goes_through_to_out(host):
    """One UNet call: a replace patch returning v/2 equals swapping that attn1 for to_out(to_v(x) / 2)."""
    h, _ = host
    from backend.patcher.base import set_model_options_patch_replace

    patcher = h.sd_model.forge_objects.unet
    kmodel, unet = patcher.model, patcher.model.diffusion_model
    x = torch.randn(2, 4, 8, 8) * 3
    sigma = torch.tensor([2.0, 2.0])
    c = h.sd_model.get_learned_conditioning(["a", "b"])
    options = set_model_options_patch_replace(
        {"transformer_options": {}}, lambda q, k, v, e: v * 0.5, "attn1", "middle", 0
    )
    attn = next(m for n, m in unet.named_modules() if n.startswith("middle_block.") and n.endswith("attn1"))
    with torch.inference_mode():
        patched = kmodel.apply_model(x, sigma, c_crossattn=c, transformer_options=dict(options["transformer_options"]))
        attn.forward = lambda x, context=None, mask=None, **kw: attn.to_out(attn.to_v(x) * 0.5)
        try:
            swapped = kmodel.apply_model(x, sigma, c_crossattn=c, transformer_options={})
        finally:
            del attn.forward
        plain = kmodel.apply_model(x, sigma, c_crossattn=c, transformer_options={})
    assert (patched - swapped).abs().max() <= tol(swapped)
    assert not torch.equal(patched, plain)


def test_replace_key_third_element_is_block_index_and_attn1_patch_runs_first(host):
    h, probe = host
    hits = []
    unet = h.sd_model.forge_objects.unet.model.diffusion_model
    last = max(i for i, blk in enumerate(unet.output_blocks) if any(hasattr(m, "transformer_blocks") for m in blk))

    def edit(u):
        u.set_model_attn1_replace(
            lambda q, k, v, e: hits.append(("full", e["block"], e["transformer_index"])) or v, "output", last, 0
        )
        u.set_model_attn1_replace(lambda q, k, v, e: hits.append(("never", e["block"])) or v, "output", last, 7)
        u.set_model_attn1_patch(lambda n, ctx, val, e: (hits.append(("pre", e["block"])) or n, ctx, val))
        u.set_model_attn1_output_patch(lambda n, e: n)

    probe.HOOKS["process_before_every_sampling"] = lambda p, *a, **k: patch_clone(p, edit)
    h.txt2img(**{**BASE, "steps": 1})
    full = [x for x in hits if x[0] == "full"]
    assert full and all(
        b == ("output", last) and t > 0 for _, b, t in full
    )  # matched on block_index 0, transformer_index > 0
    assert not [x for x in hits if x[0] == "never"]
    assert hits.index(("pre", ("output", last))) < hits.index(full[0])


# ---- sampler functions ------------------------------------------------------------------------------
def test_post_cfg_gets_documented_args_and_returns_the_new_denoised(host):
    h, probe = host
    seen = []
    calc = h.backend.sampling.sampling_function.calc_cond_uncond_batch

    def post_cfg(args):
        seen.append(args)
        again, none = calc(args["model"], args["cond"], None, args["input"], args["sigma"], args["model_options"])
        assert (again - args["cond_denoised"]).abs().max() <= tol(again) and not none.any()
        return args["cond_denoised"]  # CFG undone: the run must equal a CFG-1 run

    probe.HOOKS["process_before_every_sampling"] = lambda p, *a, **k: patch_clone(
        p, lambda u: u.set_model_sampler_post_cfg_function(post_cfg)
    )
    out = h.txt2img(**BASE, batch_size=2).samples
    probe.HOOKS.clear()
    cfg1 = h.txt2img(**{**BASE, "cfg_scale": 1.0}, batch_size=2).samples

    assert (out - cfg1).abs().max() <= tol(cfg1)
    args = seen[0]
    assert set(args) == {
        "denoised",
        "cond",
        "uncond",
        "model",
        "uncond_denoised",
        "cond_denoised",
        "sigma",
        "model_options",
        "input",
    }
    assert args["model"] is h.sd_model.forge_objects.unet.model or hasattr(args["model"], "predictor")
    assert isinstance(args["cond"], list) and "model_conds" in args["cond"][0]
    assert args["input"].shape == (2, 4, 8, 8) and args["sigma"].shape == (2,)
    expected = args["uncond_denoised"] + (args["cond_denoised"] - args["uncond_denoised"]) * 5.0
    assert (args["denoised"] - expected).abs().max() <= tol(expected)


def test_cfg_callbacks_as_forge(host):
    h, _ = host
    cb = h.modules.script_callbacks
    denoiser, denoised, after = [], [], []
    cb.on_cfg_denoiser(lambda p: denoiser.append((p.x.shape, p.sigma.shape, p.sampling_step, p.total_sampling_steps)))
    cb.on_cfg_denoised(lambda p: denoised.append(1))
    cb.on_cfg_after_cfg(lambda p: after.append(p.x.shape))
    h.txt2img(**BASE, batch_size=2)
    # un-batched x; sampling_step is set by the sampler callback after each step, so it lags by one
    assert denoiser == [((2, 4, 8, 8), (2,), i, 3) for i in (0, 0, 1)]
    assert denoised == [] and len(after) == 3
    assert h.callback_count("cfg_denoiser") == 1 and h.callback_count() == 3


# ---- passes ------------------------------------------------------------------------------------------------
def test_hires_with_hr_cfg_1_has_no_uncond_and_calls_the_hook_twice(host):
    h, probe = host
    uncond = []
    h.modules.script_callbacks.on_cfg_denoiser(lambda p: uncond.append(p.text_uncond is None))
    out = h.txt2img(**BASE, batch_size=2, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5)
    hooks = [(e["hook"], e["hr"]) for e in probe.LOG]
    assert hooks == [
        ("process", False),
        ("process_before_every_sampling", False),
        ("before_hr", True),
        ("process_before_every_sampling", True),
        ("process_before_every_sampling", True),
        ("postprocess", False),
    ]
    first = [c for c in h.unet_calls if c["shape"][2:] == (8, 8)]
    hires = [c for c in h.unet_calls if c["shape"][2:] == (12, 12)]
    assert [c["rows"] for c in first] == [4] * 3
    assert hires and all(c["rows"] == 2 and c["cond_or_uncond"] == [0] for c in hires)
    assert uncond == [False] * 3 + [True] * len(hires)
    assert out.samples.shape == (2, 4, 12, 12)
    assert [(s["kind"], s["cfg"], s["uc"]) for s in out.sampling_passes] == [
        ("txt2img", 5.0, True),
        ("hires", 1.0, False),
    ]


def test_hires_cfg_above_1_keeps_uncond(host):
    h, _ = host
    h.txt2img(**BASE, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5, hr_cfg=3.0)
    assert {c["rows"] for c in h.unet_calls if c["shape"][2:] == (12, 12)} == {2}


def test_forge_objects_unet_is_reset_before_every_pass(host):
    h, probe = host
    marks = []

    def hook(p, *args, **kwargs):
        n = len([e for e in probe.LOG if e["hook"] == "process_before_every_sampling"])
        patch_clone(
            p,
            lambda u: (
                u.set_transformer_option("mark", n),
                u.set_model_attn1_output_patch(lambda x, e: marks.append(e["mark"]) or x),
            ),
        )

    probe.HOOKS["process_before_every_sampling"] = hook
    h.txt2img(**{**BASE, "steps": 2}, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=1.0)
    original = h.sd_model.forge_objects_after_applying_lora.unet
    seen = [e["unet"] for e in probe.LOG if e["hook"] == "process_before_every_sampling"]
    assert seen[0] is original and seen[2] is original
    assert seen[1] is not original and seen[1].model_options["transformer_options"]["mark"] == 1  # before the reset
    assert set(marks) == {1, 3}  # first pass patched by call 1, hires pass by call 3; call 2's clone discarded
    assert h.sd_model.forge_objects.unet.model_options["transformer_options"].get("mark") == 3


def test_inference_mode_during_sampling_only(host):
    h, probe = host
    h.txt2img(**{**BASE, "steps": 2})
    assert h.unet_calls and all(c["inference_mode"] for c in h.unet_calls)
    modes = {e["hook"]: e["inference"] for e in probe.LOG}
    assert modes == {"process": False, "process_before_every_sampling": True, "postprocess": False}


def test_img2img_mask_blends_and_hook_gets_init_latent(host):
    from PIL import Image

    h, probe = host
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # regenerate the left half
    out = h.img2img(**BASE, mask=mask, mask_blur=0, inpaint_full_res=False, denoising_strength=0.75)
    p = h.last_p
    assert p.mask.shape == p.nmask.shape == (4, 8, 8)
    assert torch.equal(p.nmask[0, :, :4], torch.ones(8, 4)) and torch.equal(p.mask[0, :, 4:], torch.ones(8, 4))
    assert torch.equal(out.samples[0, :, :, 4:], p.init_latent[0, :, :, 4:])  # final blend keeps the original
    hook = next(e for e in probe.LOG if e["hook"] == "process_before_every_sampling")
    assert hook["kwargs"]["x"] is p.init_latent and hook["kwargs"]["noise"].shape == (1, 4, 8, 8)
    assert len(h.unet_calls) == int(0.75 * 3) + 1  # t_enc + 1 steps


def test_hr_checkpoint_switch_fires_model_loaded_and_switches_back(host):
    h, probe = host
    loaded = []
    h.modules.script_callbacks.on_model_loaded(lambda m: loaded.append(m.sd_checkpoint_info.title))
    h.txt2img(
        **{**BASE, "steps": 2},
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler="Latent",
        denoising_strength=0.5,
        hr_checkpoint_name="tiny-sd1-alt.safetensors",
    )
    unets = [e["unet"].model for e in probe.LOG if e["hook"] == "process_before_every_sampling"]
    assert loaded == ["tiny-sd1-alt.safetensors"] and unets[0] is not unets[2]
    h.txt2img(**{**BASE, "steps": 1})
    assert loaded == ["tiny-sd1-alt.safetensors", "tiny-sd1.safetensors"]


# ---- A1111 layer: hooks, errors, API ------------------------------------------------------------
def test_hook_exception_is_reported_and_generation_continues(host):
    h, probe = host

    def boom(p, *args, **kwargs):
        raise RuntimeError("probe failure")

    probe.HOOKS["process_before_every_sampling"] = boom
    out = h.txt2img(**{**BASE, "steps": 1})
    assert out.samples is not None
    assert any("process_before_every_sampling" in msg and isinstance(e, RuntimeError) for msg, e in h.errors)


def test_script_args_positional_from_ui_defaults_and_api(host):
    h, probe = host
    h.txt2img(**{**BASE, "steps": 1}, script_args=[True])
    assert probe.LOG[0]["args"] == (True, 2.5)  # missing trailing args keep the ui() default

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    image = h.modules.api.api.decode_base64_to_image("data:image/png;base64," + b64)
    assert image.size == (64, 64)

    probe.LOG.clear()
    status, res = h.api_txt2img({**BASE, "steps": 1, "alwayson_scripts": {"double PROBE": {"args": [True, 7, "extra"]}}})
    assert status == 200, res
    assert probe.LOG[0]["args"] == (True, 7) and res["processed"].samples.shape == (1, 4, 8, 8)
    status, res = h.api_img2img(
        {
            **BASE,
            "steps": 2,
            "init_images": [b64],
            "denoising_strength": 0.5,
            "alwayson_scripts": {"Double Probe": {"args": [False]}},
        }
    )
    assert status == 200 and len(res["images"]) == 1
    status, res = h.api_txt2img({**BASE, "alwayson_scripts": {"No Such Script": {"args": []}}})
    assert status == 422 and "No Such Script" in res["detail"]


def test_unsupported_model_has_no_unet_but_runs(host):
    h, _ = host
    model = h.modules.sd_models.load_unsupported()
    assert not (model.is_sd1 or model.is_sd2 or model.is_sdxl or model.is_sd3)
    dm = model.forge_objects.unet.model.diffusion_model
    assert not hasattr(dm, "input_blocks") and not any(n.endswith("attn1") for n, _ in dm.named_modules())
    out = h.txt2img(**{**BASE, "cfg_scale": 1.0, "steps": 2})
    assert out.samples.shape == (1, 4, 8, 8) and h.sd_model is model


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_other_kinds_run(kind):
    with forge_host(kind) as h:
        out = h.txt2img(**{**BASE, "steps": 2})
        assert getattr(h.sd_model, f"is_{kind}") and out.samples.shape == (1, 4, 8, 8)


def test_host_modules_are_restored_on_exit():
    sentinel = type(sys)("modules")
    sys.modules["modules"] = sentinel
    try:
        with forge_host("sd1") as h:
            assert sys.modules["modules"] is not sentinel
            # the host modules are the double's own files, not whatever ``modules`` was imported before
            assert pathlib.Path(h.modules.shared.__file__).resolve().is_relative_to(FORGE_ROOT)
            assert pathlib.Path(sys.modules["modules"].__file__).resolve().is_relative_to(FORGE_ROOT)
        assert sys.modules["modules"] is sentinel
        assert not any(n.startswith(("backend", "modules.")) for n in sys.modules)
    finally:
        del sys.modules["modules"]


@pytest.mark.parametrize(
    ("sampler", "calls"), [("Euler", 2), ("Euler a", 2), ("DPM++ 2M", 2), ("Heun", 3), ("DPM++ SDE", 3)]
)
def test_real_kdiffusion_samplers(sampler, calls):
    with forge_host("sd1") as h:
        import k_diffusion.sampling

        steps = []
        h.modules.script_callbacks.on_cfg_denoiser(lambda p: steps.append(p.denoiser.total_steps))
        out = h.txt2img(**{**BASE, "sampler_name": sampler, "steps": 2})
        assert len(h.unet_calls) == calls
        assert set(steps) == {4 if sampler in ("Heun", "DPM++ SDE") else 2}  # second-order samplers count double
        assert torch.isfinite(out.samples).all()
    assert k_diffusion.sampling.torch is torch  # the double puts torch back after the sampler's TorchHijack


def test_inference_weights_reproduce_the_forge_backward_pitfall():
    """Forge 2.x loads weights under inference_mode: autograd through the UNet then fails (§10.7)."""
    with forge_host("sd1", inference_weights=True) as h:
        kmodel = h.sd_model.forge_objects.unet.model
        assert next(kmodel.diffusion_model.parameters()).is_inference()
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.randn(1, 4, 8, 8, requires_grad=True)
            c = h.sd_model.get_learned_conditioning(["a"]).clone()
            with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
                kmodel.apply_model(x, torch.tensor([1.0]), c_crossattn=c).sum().backward()
