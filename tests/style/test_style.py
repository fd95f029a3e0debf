"""Style reference (Attention Distillation): the loss against an independent computation, its gradient against
finite differences, and AD-guided sampling on the A1111 and Forge doubles (tiny real ldm UNet, real k-diffusion
samplers, a real photo as the style image)."""

from __future__ import annotations

import contextlib
import importlib

import k_diffusion.external
import pytest
import torch
from PIL import Image

from lib_attn import color
from lib_attn import settings as S
from lib_attn.methods.style import core as style
from lib_attn.registry import PatchSet
from tests.fakes.a1111_double import a1111_host
from tests.fakes.forge_env import forge_host
from tests.support.helpers import SCRIPT, assert_no_leftovers
from tests.support.images import photo, small

BASE = dict(prompt="a red cube", negative_prompt="", seed=11, steps=6, cfg_scale=5.0, width=96, height=80,
            sampler_name="Euler")
SD1_LAYERS = [f"output_blocks.{n}.1.transformer_blocks.0.attn1" for n in range(6, 12)]


def style_args(reference, **kw):
    return [{"style": {"reference": reference, **kw}}]


# ---------------------------------------------------------------------------------------------
# the loss, its gradient
# ---------------------------------------------------------------------------------------------
def explicit_attention(q, k, v, h, tau=1.0):
    """softmax(tau q k^T / sqrt(d)) v, head by head, with an explicit softmax."""
    b, _n, c = q.shape
    d = c // h
    out = torch.empty_like(q)
    for row in range(b):
        for head in range(h):
            sl = slice(head * d, (head + 1) * d)
            logits = (tau * q[row, :, sl]) @ k[row, :, sl].T / d**0.5
            out[row, :, sl] = torch.softmax(logits, dim=-1) @ v[row, :, sl]
    return out


def explicit_ad_loss(q, k, v, k_ref, v_ref, h, tau):
    o = explicit_attention(q, k, v, h)
    t = explicit_attention(q, k_ref, v_ref, h, tau)
    return sum((o[r] - t[r]).abs().mean() for r in range(q.shape[0]))


@pytest.mark.parametrize("tau", [1.0, 1.5])
def test_ad_loss_equals_the_formula(tau):
    g = torch.Generator().manual_seed(3)
    b, n, m, c, h = 2, 12, 20, 16, 4
    q, k, v = (torch.randn(b, n, c, generator=g, dtype=torch.float64) for _ in range(3))
    k_ref, v_ref = (torch.randn(b, m, c, generator=g, dtype=torch.float64) for _ in range(2))
    o = style.attention(q, k, v, h)
    assert (o - explicit_attention(q, k, v, h)).abs().max() < 1e-12
    got = style.ad_loss(o, q, k_ref, v_ref, h, tau)
    assert abs(float(got) - float(explicit_ad_loss(q, k, v, k_ref, v_ref, h, tau))) < 1e-10


def _unet_inputs(seed=0, rows=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, 8, 12, generator=g, dtype=torch.float64)
    t = torch.full((rows,), 400.0, dtype=torch.float64)
    ctx = torch.randn(rows, 7, 32, generator=g, dtype=torch.float64)
    return x, t, ctx


@contextlib.contextmanager
def recording(unet, rec, layers=SD1_LAYERS, checkpoint=False):
    with PatchSet() as ps:
        for name in layers:
            ps.wrap_forward(unet.get_submodule(name), style.self_attention_wrapper(rec, name))
        if checkpoint:
            for block in style.blocks(unet):
                ps.wrap_forward(block, style.checkpointed(rec))
        yield


def guided_loss(unet, z, x_ref, t, ctx, tau=1.0, checkpoint=False, grad=False):
    """The recorder's loss for latent ``z`` against reference latent ``x_ref`` (a capture call, then a guided call);
    with ``grad``, ``(loss, d loss / d z)`` (the backward runs while the patches are on, as in the hosts)."""
    rec = style.Recorder(tau=tau)
    with recording(unet, rec, checkpoint=checkpoint):
        rec.mode, rec.capture_rows = "capture", [("ref", 0)]
        with torch.no_grad():
            unet(x_ref, t, context=ctx)
        rec.mode, rec.ref_of = "guided", [(0,)] * z.shape[0]
        if not grad:
            unet(z, t, context=ctx)
            rec.mode = None
            return rec.loss()
        with style.grad_enabled():
            z = z.detach().clone().requires_grad_(True)
            unet(z, t, context=ctx)
            rec.mode = None
            loss = rec.loss()
            return loss.detach(), torch.autograd.grad(loss, z)[0]


def test_loss_on_the_unet_equals_an_independent_computation(unet64):
    """Forward hooks on an unpatched UNet grab each layer's input; q, k, v and the loss are computed from scratch."""
    x, t, ctx = _unet_inputs(0)
    x_ref, _, _ = _unet_inputs(1)
    mods = [unet64.get_submodule(n) for n in SD1_LAYERS]
    grabbed = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, i=i: grabbed.__setitem__(i, a[0])) for i, m in enumerate(mods)]
    try:
        with torch.no_grad():
            unet64(x_ref, t, context=ctx)
            ref_in = dict(grabbed)
            unet64(x, t, context=ctx)
            cur_in = dict(grabbed)
    finally:
        for hk in hooks:
            hk.remove()
    want = 0.0
    for i, m in enumerate(mods):
        q, k, v = m.to_q(cur_in[i]), m.to_k(cur_in[i]), m.to_v(cur_in[i])
        want += float(explicit_ad_loss(q, k, v, m.to_k(ref_in[i]), m.to_v(ref_in[i]), m.heads, 1.3))
    got = float(guided_loss(unet64, x, x_ref, t, ctx, tau=1.3))
    assert want > 0.01
    assert abs(got - want) < 1e-10


def frozen_target_loss(unet, x_ref, t, ctx, z0, tau=1.0):
    """The AD loss as a function of z with the stop-gradient target frozen at z0, written from scratch with
    forward hooks on the unpatched UNet (what the analytic gradient at z0 is the derivative of)."""
    mods = [unet.get_submodule(n) for n in SD1_LAYERS]

    def layer_inputs(x):
        grabbed = {}
        hooks = [m.register_forward_hook(lambda mod, a, o, i=i: grabbed.__setitem__(i, a[0])) for i, m in
                 enumerate(mods)]
        try:
            unet(x, t, context=ctx)
        finally:
            for hk in hooks:
                hk.remove()
        return grabbed

    with torch.no_grad():
        ref_in, cur0 = layer_inputs(x_ref), layer_inputs(z0)
        targets = [explicit_attention(m.to_q(cur0[i]), m.to_k(ref_in[i]), m.to_v(ref_in[i]), m.heads, tau)
                   for i, m in enumerate(mods)]

    def loss(z):
        with torch.no_grad():
            cur = layer_inputs(z)
            total = 0.0
            for i, m in enumerate(mods):
                h = cur[i]
                o = explicit_attention(m.to_q(h), m.to_k(h), m.to_v(h), m.heads)
                total += float(sum((o[r] - targets[i][r]).abs().mean() for r in range(o.shape[0])))
        return total

    return loss


@pytest.mark.parametrize("checkpoint", [False, True])
def test_gradient_matches_finite_differences(unet64, checkpoint):
    """The target is a stop-gradient (the official loss detaches it): the gradient at z0 is the derivative of
    the loss with the target frozen at z0, which central differences measure."""
    x, t, ctx = _unet_inputs(0)
    x_ref, _, _ = _unet_inputs(1)
    _, grad = guided_loss(unet64, x, x_ref, t, ctx, checkpoint=checkpoint, grad=True)
    frozen = frozen_target_loss(unet64, x_ref, t, ctx, x)
    g = torch.Generator().manual_seed(9)
    eps = 1e-6
    for _ in range(3):
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)
        fd = (frozen(x + eps * d) - frozen(x - eps * d)) / (2 * eps)
        analytic = float((grad * d).sum())
        assert abs(analytic) > 1e-4
        assert abs(analytic - fd) <= 1e-6 * max(1.0, abs(analytic)), (analytic, fd)


def test_builtin_checkpoint_flags_are_switched_off_and_back(unet64):
    """SD2/SDXL configs build ldm blocks with use_checkpoint: ldm's CheckpointFunction asks for the frozen weights'
    grads in backward and fails.  The guided pass switches the flags off and puts them back."""
    x, t, ctx = _unet_inputs(0)
    x_ref, _, _ = _unet_inputs(1)
    flagged = [m for m in unet64.modules() if isinstance(m.__dict__.get("use_checkpoint"), bool)
               or isinstance(m.__dict__.get("checkpoint"), bool)]
    assert flagged
    for m in flagged:
        m.__dict__["use_checkpoint" if "use_checkpoint" in m.__dict__ else "checkpoint"] = True
    try:
        with pytest.raises(RuntimeError):
            guided_loss(unet64, x, x_ref, t, ctx, grad=True)  # the host's flags as they are: the backward fails
        with style.builtin_checkpointing_off(unet64):
            _, grad = guided_loss(unet64, x, x_ref, t, ctx, grad=True)
        assert grad.abs().sum() > 0
        assert all(m.__dict__.get("use_checkpoint", m.__dict__.get("checkpoint")) is True for m in flagged)
    finally:
        for m in flagged:
            m.__dict__["use_checkpoint" if "use_checkpoint" in m.__dict__ else "checkpoint"] = False


def test_normal_weights_copies_inference_tensors_and_puts_them_back():
    with torch.inference_mode():
        lin = torch.nn.Linear(4, 3)
    weight = lin.weight
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors"):
        lin(x).sum().backward()
    with style.normal_weights(lin) as copied:
        assert copied == 2
        (g,) = torch.autograd.grad(lin(x).sum(), x)
    assert torch.allclose(g, weight.sum(0).expand(2, 4))
    assert lin.weight is weight and lin.weight.is_inference()


# ---------------------------------------------------------------------------------------------
# guided sampling on the A1111 double
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def sessions():
    """Keep the host sessions of the runs (their per-step losses)."""
    mods = [importlib.import_module(m) for m in ("lib_attn.host.a1111", "lib_attn.host.forge")]
    seen, saved = [], []
    for mod in mods:
        cls = mod.A1111Session if hasattr(mod, "A1111Session") else mod.ForgeSession
        original = cls.__init__

        def init(self, *a, _orig=original, **kw):
            _orig(self, *a, **kw)
            seen.append(self)

        saved.append((cls, original))
        cls.__init__ = init
    try:
        yield seen
    finally:
        for cls, original in saved:
            cls.__init__ = original


def ad_loss_of(h, samples, reference, sigma=0.5):
    """The AD loss of final latents against the style image, at one noise level with fixed noise (the measure)."""
    model = h.modules.shared.sd_model
    den = k_diffusion.external.CompVisDenoiser(model)
    unet = model.model.diffusion_model
    img = reference.resize((samples.shape[-1] * 8, samples.shape[-2] * 8))
    with torch.no_grad():
        z_ref = model.get_first_stage_encoding(model.encode_first_stage(color.pil_to_tensor(img)[None].float() * 2 - 1))
    noise = torch.randn(z_ref.shape, generator=torch.Generator().manual_seed(0)).to(z_ref)
    unc = model.get_learned_conditioning([""])
    cond = {"c_crossattn": [unc], "c_concat": [torch.zeros(1, 5, 1, 1)]}
    s = torch.tensor([sigma])
    out = []
    for i in range(samples.shape[0]):
        rec = style.Recorder()
        with recording(unet, rec), torch.no_grad():
            rec.mode, rec.capture_rows = "capture", [("ref", 0)]
            den(z_ref + sigma * noise, s, cond=cond)
            rec.mode, rec.ref_of = "guided", [(0,)]
            den(samples[i : i + 1] + sigma * noise, s, cond=cond)
        out.append(float(rec.loss()))
    return out


def test_off_is_bit_identical_to_no_extension():
    ref = photo("cheetah1.jpg")
    with a1111_host("sd1") as h:
        plain = h.txt2img(**BASE).samples
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        off = h.txt2img(**BASE, script_args=S.defaults().to_args()).samples
        named_off = h.txt2img(**BASE, script_args=[{"style": {"enabled": False, "reference": ref}}]).samples
        zero = h.txt2img(**BASE, script_args=style_args(ref, strength=0.0)).samples
        assert_no_leftovers(h)
    assert torch.equal(plain, off)
    assert torch.equal(plain, named_off)
    assert torch.equal(plain, zero)


def test_guided_run_lowers_the_ad_loss():
    """The final images' AD loss to the style image, against the unguided run with the same seed, for growing
    strengths (AdaIN off, so the drop is the gradient guidance's own)."""
    ref = photo("cheetah1.jpg")
    with a1111_host("sd1") as h, sessions() as seen:
        h.load_script(SCRIPT)
        plain = h.txt2img(**BASE).samples
        losses = [ad_loss_of(h, plain, ref)[0]]
        for s in (0.05, 0.3):
            out = h.txt2img(**BASE, script_args=style_args(ref, strength=s, adain=False, iters=2)).samples
            losses.append(ad_loss_of(h, out, ref)[0])
        assert_no_leftovers(h)
        inner = seen[-1].runs["style"].losses
    print("AD loss, plain / strength 0.05 / 0.3:", losses)
    assert losses[1] < losses[0] and losses[2] < losses[1]
    assert losses[2] < 0.95 * losses[0]
    assert len(inner) == BASE["steps"] and all(len(step) == 2 for step in inner)
    # within a step, the second inner iteration starts from a lower loss than the first (averaged over steps)
    assert sum(b - a for a, b in inner) < 0


def test_adain_matches_the_reference_statistics():
    """With AdaIN and a negligible gradient step, the last denoised prediction (the sample, Euler ends at 0)
    carries the style latent's per-channel mean and std."""
    ref = photo("lion.jpg")
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        out = h.txt2img(**BASE, script_args=style_args(ref, strength=1e-6, adain=True, adain_mode="denoised")).samples
        model = h.modules.shared.sd_model
        img = ref.resize((96, 80), Image.Resampling.LANCZOS)
        z_ref = model.get_first_stage_encoding(model.encode_first_stage(
            color.pil_to_tensor(img)[None].to(torch.float64) * 2 - 1))
    assert torch.allclose(out.mean((2, 3)), z_ref.mean((2, 3)), atol=1e-4)
    assert torch.allclose(out.std((2, 3)), z_ref.std((2, 3)), rtol=1e-3)


def test_batch_rows_do_not_mix_references():
    refs = [photo("cheetah1.jpg"), photo("lion.jpg")]
    kw = dict(BASE, steps=4)
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        both = h.txt2img(**kw, batch_size=2, script_args=style_args(refs, pairing="each")).samples
        first = h.txt2img(**kw, script_args=style_args(refs[0])).samples
        second = h.txt2img(**{**kw, "seed": kw["seed"] + 1}, script_args=style_args(refs[1])).samples
        assert_no_leftovers(h)
    assert (both[0] - first[0]).abs().max() < 1e-8
    assert (both[1] - second[0]).abs().max() < 1e-8
    assert (both[0] - both[1]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["sdxl", "sd2"])
def test_sdxl_and_sd2(kind):
    """SDXL: dict conds, gradient checkpointing on by default; SD2: v-prediction.  Both with the host's
    use_checkpoint flags on, as their configs build them."""
    ref = photo("cheetah2.jpg")
    kw = dict(BASE, steps=3, width=128, height=128)
    with a1111_host(kind) as h, sessions() as seen:
        h.load_script(SCRIPT)
        unet = h.modules.shared.sd_model.model.diffusion_model
        flagged = [m for m in unet.modules() if m.__dict__.get("use_checkpoint") is False]
        for m in flagged:
            m.use_checkpoint = True
        plain = h.txt2img(**kw).samples
        out = h.txt2img(**kw, script_args=style_args(ref))
        assert not h.errors
        assert (out.samples - plain).abs().max() > 1e-3
        assert len(seen[-1].runs["style"].losses) == kw["steps"]
        assert all(m.use_checkpoint is True for m in flagged)
        assert_no_leftovers(h)
        assert "Style checkpointing: auto" in out.infotexts[0]


@pytest.mark.parametrize("sampler", ["DDIM", "DPM++ 2M", "Heun"])
def test_other_samplers(sampler):
    ref = photo("cheetah1.jpg")
    kw = dict(BASE, steps=4, sampler_name=sampler)
    with a1111_host("sd1") as h, sessions() as seen:
        h.load_script(SCRIPT)
        plain = h.txt2img(**kw).samples
        out = h.txt2img(**kw, script_args=style_args(ref, adain=False)).samples
        assert not h.errors
        assert (out - plain).abs().max() > 1e-3
        assert seen[-1].runs["style"].losses
        assert_no_leftovers(h)


def test_hires_modes_pag_together_and_img2img_content():
    ref = photo("cheetah1.jpg")
    kw = dict(BASE, steps=3, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6)
    with a1111_host("sd1") as h, sessions() as seen:
        h.load_script(SCRIPT)
        counts = {}
        for mode in ("off", "same", "own"):
            h.txt2img(**kw, script_args=style_args(ref, hires=mode, hires_strength=0.2))
            counts[mode] = len(seen[-1].runs["style"].losses)
        assert counts["off"] == 3 and counts["same"] == counts["own"] > 3  # the hires pass is guided too
        # with PAG, on a layer both act on
        args = [{"style": {"reference": ref}, "pag": {"scale": 2.0, "layers": "output.9"}}]
        both = h.txt2img(**BASE, script_args=args).samples
        only_style = h.txt2img(**BASE, script_args=style_args(ref)).samples
        only_pag = h.txt2img(**BASE, script_args=[{"pag": {"scale": 2.0, "layers": "output.9"}}]).samples
        assert (both - only_style).abs().max() > 1e-3 and (both - only_pag).abs().max() > 1e-3
        # img2img: the content loss acts
        init = small("lion.jpg")
        i2i = dict(BASE, init_images=[init], denoising_strength=0.7)
        a = h.img2img(**i2i, script_args=style_args(ref, content_weight=0.0, adain=False)).samples
        b = h.img2img(**i2i, script_args=style_args(ref, content_weight=2.0, adain=False)).samples
        assert (a - b).abs().max() > 1e-4
        assert not h.errors
        assert_no_leftovers(h)


@pytest.mark.parametrize(
    ("extra", "pag"),
    [({}, False), ({"adain": False, "iters": 2}, True), ({"content_weight": 0.5, "iters": 3}, False)],
)
def test_host_uncond_rows_are_the_first_guided_forward(extra, pag):
    """Where A1111 runs the uncond rows (the latent being sampled, negative prompt: what the guided pass runs), they
    run with grad as the first inner iteration's forward: one UNet row per image and guided step fewer, and the
    same result as a guided forward of its own (float64).  With PAG its rows come before them in the same call."""
    ref = photo("cheetah1.jpg")
    args = [{"style": {"reference": ref, **extra}, **({"pag": {"scale": 2.0}} if pag else {})}]
    kw = dict(BASE, batch_size=2)
    if "content_weight" in extra:
        kw.update(init_images=[small("lion.jpg")], denoising_strength=0.7)
    run = (lambda h: h.img2img(**kw, script_args=args)) if "init_images" in kw else (
        lambda h: h.txt2img(**kw, script_args=args))
    with a1111_host("sd1", dtype=torch.float64) as h, sessions() as seen:
        h.load_script(SCRIPT)
        unet = h.modules.shared.sd_model.model.diffusion_model
        rows: list[int] = []
        handle = unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
        hooks = importlib.import_module("lib_attn.methods.style.hooks_a1111").Hooks
        original = hooks._reuse
        try:
            reused = run(h).samples
            n_reused, losses_reused = sum(rows), seen[-1].runs["style"].losses
            rows.clear()
            hooks._reuse = lambda self, *a: False
            separate = run(h).samples
            n_separate, losses_separate = sum(rows), seen[-1].runs["style"].losses
        finally:
            hooks._reuse = original
            handle.remove()
        assert_no_leftovers(h)
    guided_steps = len(losses_reused)
    assert guided_steps > 0 and len(losses_separate) == guided_steps
    assert n_separate - n_reused == 2 * guided_steps  # batch 2: one forward of two rows per guided step
    # the same computation in other batches: float64 rounding, which Adam's g / (|g| + eps) magnifies where a
    # gradient entry is near eps (a first step moves every entry by about the learning rate, whatever its size)
    assert (reused - separate).abs().max() < 1e-6
    assert max(abs(a - b) for x, y in zip(losses_reused, losses_separate, strict=True) for a, b in zip(x, y, strict=True)) < 1e-9


def test_an_inpainting_model_runs_its_own_guided_forward():
    """An inpainting checkpoint's UNet sees the latent with the mask and masked image concatenated: the uncond rows'
    input is not the guided pass's, so the guided forward runs on its own (nothing shared, nothing wrong)."""
    from tests.support.tiny import make_sd_model

    ref = photo("cheetah1.jpg")
    models = {"inpaint": lambda: make_sd_model("sd1", inpainting=True)}
    kw = dict(BASE, init_images=[small("lion.jpg")], denoising_strength=0.7, steps=3)
    with a1111_host("sd1", dtype=torch.float64, models=models) as h, sessions() as seen:
        sd_models = h.modules.sd_models
        sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match("inpaint"))
        h.load_script(SCRIPT)
        unet = h.modules.shared.sd_model.model.diffusion_model
        assert unet.input_blocks[0][0].in_channels == 9
        rows: list[int] = []
        handle = unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
        try:
            out = h.img2img(**kw, script_args=style_args(ref)).samples
        finally:
            handle.remove()
        assert not h.errors
        assert len(seen[-1].runs["style"].losses) == 3
        assert_no_leftovers(h)
    # per step: the capture call (style image + content image), the WebUI's 2 rows, the guided forward's own row
    assert rows == [2, 2, 1] * 3 and torch.isfinite(out).all()


def test_failures_leave_grad_mode_hooks_and_caches_as_they_were():
    ref = photo("cheetah1.jpg")
    with a1111_host("sd1") as h, sessions() as seen:
        h.load_script(SCRIPT)
        mod = importlib.import_module("lib_attn.methods.style.core")
        original = mod.ad_loss
        calls = {"n": 0}

        def failing(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 9:
                raise RuntimeError("injected failure in the AD loss")
            return original(*a, **kw)

        mod.ad_loss = failing
        try:
            with pytest.raises(RuntimeError, match="style reference failed: RuntimeError: injected failure"):
                h.txt2img(**BASE, script_args=style_args(ref))
        finally:
            mod.ad_loss = original
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        assert_no_leftovers(h)
        recorder = next(h_ for h_ in seen[-1].hooks if hasattr(h_, "recorder")).recorder  # the style hooks'
        assert recorder.mode is None and not recorder.refs and not recorder.terms
        # an interrupt
        h.modules.shared.state.interrupt_at_step = 2
        h.txt2img(**BASE, script_args=style_args(ref))
        h.modules.shared.state.reset()
        assert_no_leftovers(h)
        again = h.txt2img(**BASE, script_args=style_args(ref)).samples
    with a1111_host("sd1") as fresh:
        fresh.load_script(SCRIPT)
        assert torch.equal(fresh.txt2img(**BASE, script_args=style_args(ref)).samples, again)


# ---------------------------------------------------------------------------------------------
# Forge double: sampling under inference_mode, weights loaded as inference tensors
# ---------------------------------------------------------------------------------------------
def test_forge_with_inference_mode_weights():
    ref = photo("cheetah1.jpg")
    kw = dict(BASE, steps=4)
    with forge_host("sd1", inference_weights=True) as h, sessions() as seen:
        h.load_script(SCRIPT)
        plain = h.txt2img(**kw).samples
        off = h.txt2img(**kw, script_args=S.defaults().to_args()).samples
        out = h.txt2img(**kw, script_args=style_args(ref, adain=False, iters=2))
        assert not h.errors
        unet = h.modules.shared.sd_model.forge_objects.unet.model.diffusion_model
        assert all(p.is_inference() for p in unet.parameters())
        assert all("forward" not in m.__dict__ for m in unet.modules())
        assert h.callback_count() == 0
        inner = seen[-1].runs["style"].losses
    assert torch.equal(plain, off)
    assert (out.samples - plain).abs().max() > 1e-3
    assert len(inner) == kw["steps"] and sum(b - a for a, b in inner) < 0
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


class _InPlaceBlock(torch.nn.Module):
    """Forge's transformer-block pattern: residual adds in place onto tensors a LayerNorm saved."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.n1, self.n2, self.lin = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

    def forward(self, x):
        x = x * 1.0
        n = self.lin(self.n1(x))
        if self.inplace:
            x += n
        else:
            x = x + n
        return self.n2(x) ** 2


def test_snapshot_of_saved_tensors_makes_in_place_blocks_differentiable_and_checkpointing_would_not():
    torch.manual_seed(1)
    ref_block, block = _InPlaceBlock(False).double(), _InPlaceBlock(True).double()
    block.load_state_dict(ref_block.state_dict())
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(ref_block(x).sum(), x)
    with pytest.raises(RuntimeError, match="inplace operation"):
        torch.autograd.grad(block(x).sum(), x)
    with style.snapshot_saved_tensors(block):
        out = block(x).sum()
    (got,) = torch.autograd.grad(out, x)
    assert torch.allclose(got, want, atol=1e-12)
    # why Forge refuses checkpointing: the recomputation keeps references the in-place add overwrites
    (wrong,) = torch.autograd.grad(torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).sum(), x)
    assert not torch.allclose(wrong, want, atol=1e-6)


def test_forge_refuses_checkpointing_on_by_name_before_sampling():
    refused = r"\(style.checkpointing\): gradient checkpointing is not available"
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        with pytest.raises(S.SettingsError, match=refused):
            h.txt2img(**{**BASE, "steps": 2}, script_args=style_args(photo("lion.jpg"), checkpointing="on"))
        assert h.unet_calls == []  # refused in the settings check: no sampling step ran
        assert h.callback_count() == 0
        # style only in the hires pass: refused before the first pass too
        hires_only = style_args(photo("lion.jpg"), strength=0.0, hires="own", hires_strength=0.1, checkpointing="on")
        hr = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6)
        with pytest.raises(S.SettingsError, match=refused):
            h.txt2img(**{**BASE, "steps": 2, **hr}, script_args=hires_only)
        assert h.unet_calls == []
        assert h.callback_count() == 0


# ---------------------------------------------------------------------------------------------
# the paper's options: AdaIN on the noisy latent, several style images attended together
# ---------------------------------------------------------------------------------------------
def test_several_style_images_are_attended_together():
    """ref_of (0, 1): the queries read the two references' keys and values concatenated along the tokens (the
    official code's several style images), against an explicit computation."""
    g = torch.Generator().manual_seed(3)
    b, n, m, c, h = 2, 6, 5, 8, 2
    q, k, v = (torch.randn(b, n, c, generator=g, dtype=torch.float64) for _ in range(3))
    refs = {r: (torch.randn(m, c, generator=g, dtype=torch.float64), torch.randn(m, c, generator=g,
                                                                                dtype=torch.float64)) for r in (0, 1)}
    rec = style.Recorder()
    rec.refs = {"layer": refs}
    rec.mode, rec.ref_of = "guided", [(0, 1), (1, 0)]
    rec.attend("layer", q, k, v, h)
    got = float(rec.loss())
    both = (torch.cat([refs[0][0], refs[1][0]]), torch.cat([refs[0][1], refs[1][1]]))
    want = float(explicit_ad_loss(q, k, v, both[0].expand(b, -1, -1), both[1].expand(b, -1, -1), h, 1.0))
    assert abs(got - want) < 1e-10
    # and not what one reference alone gives
    alone = float(explicit_ad_loss(q[:1], k[:1], v[:1], refs[0][0][None], refs[0][1][None], h, 1.0)
                  + explicit_ad_loss(q[1:], k[1:], v[1:], refs[1][0][None], refs[1][1][None], h, 1.0))
    assert abs(got - alone) > 1e-3


def test_pairing_all_and_each_in_a_generation():
    """all (default): any number of style images, every image attends to all of them; each: one per image, and a
    count that fits neither 1 nor the batch is refused naming the field."""
    refs = [photo("cheetah1.jpg"), photo("lion.jpg"), photo("cheetah1.jpg").rotate(90)]
    kw = dict(BASE, steps=3, batch_size=2)
    with a1111_host("sd1") as h, sessions() as seen:
        h.load_script(SCRIPT)
        three = h.txt2img(**kw, script_args=style_args(refs)).samples
        assert seen[-1].runs["style"].ref_index(2) == [(0, 1, 2), (0, 1, 2)]
        one = h.txt2img(**kw, script_args=style_args(refs[:1])).samples
        each = h.txt2img(**kw, script_args=style_args(refs[:2], pairing="each")).samples
        assert seen[-1].runs["style"].ref_index(2) == [(0,), (1,)]
        with pytest.raises(Exception, match=r"Style image \(style\.reference\).*each"):
            h.txt2img(**kw, script_args=style_args(refs, pairing="each"))
        assert_no_leftovers(h)
    assert (three - one).abs().max() > 1e-3 and (three - each).abs().max() > 1e-3


def test_noisy_adain_matches_the_latent_to_the_noised_style_latent():
    """AdaIN on 'noisy' (the paper's): at a one-step run (the sample is the denoised prediction, the step gain 1)
    with a negligible gradient step, the sample moves by adain(x, z_ref + sigma n) - x against the run without
    AdaIN: x the initial latent, n the style noise of that step."""
    from lib_attn.methods.style.run import StyleInputs

    ref = photo("lion.jpg")
    kw = dict(BASE, steps=1)
    seen_x = []
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        def spy(params):
            seen_x.append((params.x[:1].clone(), params.sigma[:1].clone()))

        h.modules.script_callbacks.on_cfg_denoiser(spy)
        off = h.txt2img(**kw, script_args=style_args(ref, strength=1e-9, adain=False)).samples
        noisy = h.txt2img(**kw, script_args=style_args(ref, strength=1e-9, adain=True, adain_mode="noisy")).samples
        model = h.modules.shared.sd_model
        img = ref.resize((96, 80), Image.Resampling.LANCZOS)
        z_ref = model.get_first_stage_encoding(model.encode_first_stage(
            color.pil_to_tensor(img)[None].to(torch.float64) * 2 - 1))
        spies = h.modules.script_callbacks.callback_map["callbacks_cfg_denoiser"]
        spies[:] = [c for c in spies if c.callback is not spy]  # the test's own callback; then nothing is left
        assert_no_leftovers(h)
    x, sigma = seen_x[-1]
    si = StyleInputs([ref])
    si.seeds = [BASE["seed"]]
    n = si.noise(0, [0], x.shape, x)
    noised = z_ref + sigma.view(-1, 1, 1, 1) * n
    mx, sx = x.mean((2, 3), keepdim=True), x.std((2, 3), keepdim=True)
    mr, sr = noised.mean((2, 3), keepdim=True), noised.std((2, 3), keepdim=True)
    want = (x - mx) / sx * sr + mr - x
    got = noisy - off
    assert want.abs().max() > 1e-2
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
