"""Masked upscaling (YODA) through the WebUI doubles: img2img and the hires-fix pass, DINO (a random-init ViT saved
into the models folder, no download) and UNet sources, with the edit mask and PAG, on A1111 and Forge."""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch

from lib_attn import settings as S
from lib_attn.methods.yoda import core as yd
from lib_attn.methods.yoda import dino
from tests.fakes.a1111_double import a1111_host
from tests.support.helpers import SCRIPT, assert_no_leftovers
from tests.support.images import photo
from tests.support.vit import tiny_vit

BASE = dict(prompt="a cat on a table", negative_prompt="", seed=5, steps=6, cfg_scale=5.0, width=96, height=80,
            sampler_name="Euler", denoising_strength=0.7)
T2I = {k: v for k, v in BASE.items() if k != "denoising_strength"}


def yoda_args(**kw):
    values = {"yoda_enabled": True, "yoda_source": "unet", **{f"yoda_{k}": v for k, v in kw.items()}}
    return S.defaults().with_values(values).to_args()


@pytest.fixture
def dino_models(tmp_path):
    """A WebUI models folder holding a random-init DINO-like ViT saved as ``dino/dino-vits8`` (what a first-use
    download leaves there); the host's ``modules.paths.models_path`` is pointed at it inside each host block."""
    torch.manual_seed(0)
    tiny_vit(patch_size=8).save_pretrained(tmp_path / "dino" / "dino-vits8")
    return tmp_path


def point_models_at(monkeypatch, folder):
    paths = importlib.import_module("modules.paths")
    monkeypatch.setattr(paths, "models_path", str(folder))


def spy(monkeypatch, host="a1111"):
    """Per model call of a YODA pass: the model input after the blend (Forge: one row per image), sigma, this
    call's mask, the source, the noise, the call index and count.  (Call inside the host block.)"""
    cls = importlib.import_module(f"lib_attn.methods.yoda.hooks_{host}").Hooks
    name = "input" if host == "a1111" else "on_denoiser"
    seen = []
    orig = getattr(cls, name)

    def wrapped(self, params, *a):
        out = orig(self, params, *a)
        run, at, p = self.run, self.at, self.ctx.p
        if at is None:
            return out
        seen.append(dict(x=params.x.clone(), sigma=params.sigma.clone(), layout=a[0] if a else None,
                         mask=None if run.mask is None else run.mask.clone(), z0=run.z0, noise=run.noise, at=at,
                         hr=bool(getattr(p, "is_hr_pass", False))))
        return out

    monkeypatch.setattr(cls, name, wrapped)
    return seen


def masks_of(monkeypatch):
    """Every mask the run makes, per pass, in call order (YodaRun is host-free)."""
    from lib_attn.methods.yoda import run as yoda_io

    passes = [[]]
    orig_mask, orig_begin = yoda_io.YodaRun.mask_for, yoda_io.YodaRun.begin_pass

    def mask_for(self, call, total):
        fresh = self._mask_call != call
        m = orig_mask(self, call, total)
        if m is not None and fresh:
            passes[-1].append((call, total, m.clone(), self.amap.clone()))
        return m

    def begin_pass(self, plan):
        if passes[-1]:
            passes.append([])
        return orig_begin(self, plan)

    monkeypatch.setattr(yoda_io.YodaRun, "mask_for", mask_for)
    monkeypatch.setattr(yoda_io.YodaRun, "begin_pass", begin_pass)
    return passes


def check_outside_is_noised_source(seen, atol, alphas=None):
    """At every call after the first, the model input equals the source noised to the call's level where the mask
    is 0: ``z0 + sigma * noise`` (k-diffusion), ``sqrt(a) z0 + sqrt(1 - a) noise`` (timestep samplers: ``alphas``)."""
    checked = 0
    for st in seen:
        if st["at"] is None or st["at"][0] == 0 or st["mask"] is None:
            continue
        m, z0 = st["mask"], st["z0"]
        if st["layout"] is None:  # Forge: one row per image
            rows = [(r, r) for r in range(st["x"].shape[0])]
        else:
            plain = st["layout"].with_groups([])
            rows = [(r, plain.image_of_row(r)) for r in range(plain.n_cond + plain.n_images)]
        for r, i in rows:
            out = (m[i] == 0).expand_as(z0[i])
            if not out.any():
                continue
            if alphas is None:
                want = z0[i] + st["noise"][i] * st["sigma"][r]
            else:
                a = alphas[st["sigma"][r].long()].to(z0)
                want = a.sqrt() * z0[i] + (1 - a).sqrt() * st["noise"][i]
            assert torch.allclose(st["x"][r][out], want[out].to(st["x"]), atol=atol)
            checked += 1
    return checked


# ---------------------------------------------------------------------------------------------
# the UNet source's saliency (pure)
# ---------------------------------------------------------------------------------------------
def test_unet_saliency_is_one_minus_normalized_attention_entropy():
    torch.manual_seed(1)
    q, k = torch.randn(2, 30, 16, dtype=torch.float64), torch.randn(2, 30, 16, dtype=torch.float64)
    got = yd.self_attention_saliency(q, k, 4)
    want = torch.zeros(2, 30, dtype=torch.float64)
    for h in range(4):
        sl = slice(4 * h, 4 * h + 4)
        p = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / 2.0, dim=-1)
        want += 1 - (-(p * p.log()).sum(-1)) / math.log(30)
    assert got.shape == (2, 30) and torch.allclose(got.double(), want / 4, atol=1e-5)


def test_unet_saliency_is_high_on_a_small_distinct_region():
    """Tokens of a large uniform region (alike keys) spread their attention; tokens of a small region with keys of
    their own attend to a few: the small region scores higher."""
    torch.manual_seed(2)
    n, c = 64, 16
    base = torch.randn(1, c)
    feats = base.expand(n, c).clone() + 0.05 * torch.randn(n, c)
    distinct = torch.arange(8)
    feats[distinct] = 3 * torch.randn(8, c)
    s = yd.self_attention_saliency(feats[None], feats[None], 2)[0]
    assert s[distinct].mean() > s[8:].mean() + 0.2


# ---------------------------------------------------------------------------------------------
# A1111 double
# ---------------------------------------------------------------------------------------------
def test_off_is_bit_identical_in_img2img_and_hires():
    init = photo("cheetah1.jpg")
    with a1111_host("sd1", dtype=torch.float64) as h:
        plain_i = h.img2img(init_images=[init], **BASE)
        plain_t = h.txt2img(enable_hr=True, hr_scale=1.5, **T2I)
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        off_args = S.defaults().with_values({"yoda_source": "unet", "yoda_start_coverage": 0.5}).to_args()
        off_i = h.img2img(script_args=off_args, init_images=[init], **BASE)
        off_t = h.txt2img(script_args=off_args, enable_hr=True, hr_scale=1.5, **T2I)
        on_i = h.img2img(script_args=yoda_args(), init_images=[init], **BASE)
    assert torch.equal(plain_i.samples, off_i.samples) and torch.equal(plain_t.samples, off_t.samples)
    assert (on_i.samples - plain_i.samples).abs().max() > 1e-4


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "Euler a", "DDIM"])
def test_img2img_outside_the_mask_is_the_noised_source_and_masks_grow_to_all(monkeypatch, sampler):
    init = photo("cheetah2.jpg")
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        seen, passes = spy(monkeypatch), masks_of(monkeypatch)
        res = h.img2img(script_args=yoda_args(blur=0, start_coverage=0.3), init_images=[init], batch_size=2,
                        **{**BASE, "sampler_name": sampler, "steps": 10 if sampler == "DDIM" else 6})
        assert not h.errors
        assert_no_leftovers(h)
        alphas = h.modules.shared.sd_model.alphas_cumprod.double() if sampler == "DDIM" else None
        start_noise = h.modules.processing.create_noise([BASE["seed"], BASE["seed"] + 1], seen[0]["z0"].shape[1:])
    z0 = seen[0]["z0"]
    # the source is the init latent; the noise is the one the sampler started from (k-diffusion: x = z0 + sigma n)
    if sampler != "DDIM":
        assert torch.allclose(seen[0]["noise"], start_noise.to(z0), atol=1e-6)
    assert check_outside_is_noised_source(seen, 1e-9, alphas) >= 4
    masks = [m for _, _, m, _ in passes[0]]
    assert len(masks) == len(seen)  # one mask per model call
    cover = [float(m.mean()) for m in masks]
    assert abs(cover[0] - 0.3) < 0.05  # the start coverage (ties may add a little)
    for a, b in itertools.pairwise(masks):  # nested: a pixel once in stays in
        assert bool((b >= a).all())
    assert torch.equal(masks[-1], torch.ones_like(masks[-1]))  # the last call diffuses everything
    assert (res.samples - z0).abs().max() > 1e-3


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_pass_only_and_its_source_is_the_upscaled_latent(monkeypatch, upscaler):
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        seen, passes = spy(monkeypatch), masks_of(monkeypatch)
        res = h.txt2img(script_args=yoda_args(blur=0), enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler,
                        hr_second_pass_steps=5, batch_size=2, **T2I)
        assert not h.errors
        assert_no_leftovers(h)
    assert seen and all(st["hr"] for st in seen)  # nothing in the first pass
    z0 = seen[0]["z0"]
    assert tuple(z0.shape[-2:]) == (120 // 8, 144 // 8)
    assert check_outside_is_noised_source(seen, 1e-9) >= 3
    masks = [m for _, _, m, _ in passes[0]]
    assert torch.equal(masks[-1], torch.ones_like(masks[-1])) and float(masks[0].mean()) < 0.5
    assert res.samples.shape[-2:] == z0.shape[-2:]


def test_hires_checkpoint_switch(monkeypatch):
    """An own checkpoint for the hires pass: the UNet source's map comes from the switched model's attention, the
    blend holds, and no patch stays on either model."""
    from tests.support.tiny import make_sd_model

    with a1111_host("sd1", dtype=torch.float64, models={"other": lambda: make_sd_model("sd1", seed=7)}) as h:
        h.load_script(SCRIPT)
        first = h.modules.shared.sd_model
        seen, passes = spy(monkeypatch), masks_of(monkeypatch)
        h.txt2img(script_args=yoda_args(blur=0), enable_hr=True, hr_scale=1.5, hr_checkpoint_name="other", **T2I)
        assert not h.errors
        second = h.modules.shared.sd_model
        assert second is not first and seen and all(st["hr"] for st in seen)
        assert check_outside_is_noised_source(seen, 1e-9) >= 2
        masks = [m for _, _, m, _ in passes[0]]
        assert torch.equal(masks[-1], torch.ones_like(masks[-1])) and float(masks[0].mean()) < 0.5
        for model in (first, second):
            for m in model.model.diffusion_model.modules():
                assert "forward" not in m.__dict__ and not m._forward_pre_hooks
        assert h.callback_count() == 0


def test_txt2img_without_hires_fix_is_refused():
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        with pytest.raises(S.SettingsError, match=r"yoda\.enabled.*hires-fix"):
            h.txt2img(script_args=yoda_args(), **T2I)
        assert_no_leftovers(h)


def test_dino_source_loads_from_the_models_folder_and_its_map_drives_the_mask(monkeypatch, dino_models):
    init = photo("cheetah1.jpg")
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        point_models_at(monkeypatch, dino_models)
        passes = masks_of(monkeypatch)
        seen = spy(monkeypatch)
        res = h.img2img(script_args=yoda_args(source="dino-vits8", show=True), init_images=[init], **BASE)
        assert not h.errors
        z0 = seen[0]["z0"]
        # independent: the host's cheap RGB preview of the source latent, enlarged, through the saved ViT
        from modules import sd_samplers_common

        rgb = ((sd_samplers_common.samples_to_images_tensor(z0, 2, h.modules.shared.sd_model).float() + 1) / 2).clamp(0, 1)
    model = dino.load_model(str(dino_models / "dino" / "dino-vits8"))
    f = 224 / max(rgb.shape[-2:])  # enlarged to DINO's 224 px
    big = torch.nn.functional.interpolate(rgb, size=(round(rgb.shape[-2] * f), round(rgb.shape[-1] * f)),
                                          mode="bicubic", align_corners=False).clamp(0, 1)
    want = yd.normalize_map(yd.resize_map(dino.attention_map(model, big, max_side=224), tuple(z0.shape[-2:])))
    amap = passes[0][0][3]
    assert amap.shape == (1, 1, *z0.shape[-2:])
    assert torch.allclose(amap, want.to(amap), atol=1e-5)
    assert amap.min() == 0 and amap.max() == 1
    # the preview: attention map | share of steps diffused, at image height
    preview = res.images[-1]
    assert len(res.images) == 2 and preview.mode == "L" and preview.size[1] == BASE["height"]
    assert preview.size[0] > 2 * BASE["width"]


def test_missing_dino_weights_offline_is_a_clear_error(monkeypatch, tmp_path):
    init = photo("cheetah1.jpg")
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        point_models_at(monkeypatch, tmp_path)
        with pytest.raises(S.SettingsError, match=r"yoda\.source.*facebook/dino-vits8.*first use.*unet"):
            h.img2img(script_args=yoda_args(source="dino-vits8"), init_images=[init], **BASE)
        code, body = h.api_img2img({**BASE, "init_images": [photo_b64()],
                                    "alwayson_scripts": {S.TITLE: {"args": [{"yoda": {"source": "dino-vitb8"}}]}}})
        assert code != 200 and "yoda.source" in str(body) and "dino-vitb8" in str(body)
        ok = h.img2img(init_images=[init], **BASE)  # the WebUI keeps serving
        assert len(ok.images) == 1
        assert_no_leftovers(h)


def photo_b64():
    import base64
    import io

    buf = io.BytesIO()
    photo("cheetah1.jpg").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_with_the_edit_mask_the_masks_multiply(monkeypatch):
    """Edit mask and masked upscaling in one img2img run: the model input keeps the noised source wherever either
    mask is 0, and the result is the source exactly where the edit mask's final mask is 0."""
    init = photo("cheetah1.jpg")
    args = S.defaults().with_values({
        "yoda_enabled": True, "yoda_source": "unet", "yoda_blur": 0, "yoda_start_coverage": 0.3,
        "edit_mask_enabled": True, "edit_mask_blur": 0, "edit_mask_grow": 0, "pag_enabled": True}).to_args()
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        seen = spy(monkeypatch)
        edit_io = importlib.import_module("lib_attn.methods.edit_mask.run")
        edit_masks = []
        orig = edit_io.EditMaskRun.update

        def update(self, hw):
            m = orig(self, hw)
            edit_masks.append(None if m is None else m.clone())
            return m

        monkeypatch.setattr(edit_io.EditMaskRun, "update", update)
        res = h.img2img(script_args=args, init_images=[init], **BASE)
        assert not h.errors and len(res.images) == 2  # the edit mask is returned; the YODA preview is off
        assert_no_leftovers(h)
    # call i's input is blended with the edit mask of call i-1 and the YODA mask of call i
    checked = 0
    for i, st in enumerate(seen[1:], start=1):
        em_prev = edit_masks[i - 1]
        both = em_prev * st["mask"]
        z0, x = st["z0"], st["x"]
        out = (both[0] == 0).expand_as(z0[0])
        want = z0[0] + st["noise"][0] * st["sigma"][0]
        assert torch.allclose(x[0][out], want[out], atol=1e-9)
        checked += int(((em_prev[0] > 0) & (st["mask"][0] == 0)).any())  # where only YODA holds the source
    assert checked >= 1
    final = edit_masks[-1]
    out = (final == 0).expand_as(res.samples)
    assert torch.allclose(res.samples[out], seen[0]["z0"][out], atol=1e-9)


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DPM2", "DPM++ SDE", "LMS", "DDIM"])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_every_sampler_ends_with_the_whole_image(monkeypatch, sampler, strength):
    """The schedule counts the pass's model calls as the host makes them (second-order samplers: one call at their
    last step; A1111's timestep samplers: two fewer than they announce), so the last call's mask is all ones."""
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        seen, passes = spy(monkeypatch), masks_of(monkeypatch)
        h.img2img(script_args=yoda_args(blur=0, start_coverage=0.1), init_images=[photo("cheetah1.jpg")],
                  **{**BASE, "sampler_name": sampler, "steps": 8, "denoising_strength": strength})
        assert not h.errors
    masks = [m for _, _, m, _ in passes[0]]
    assert len(masks) == len(seen) >= 3  # one mask per model call
    assert torch.equal(masks[-1], torch.ones_like(masks[-1]))
    assert float(masks[-2].mean()) < 1.0  # not full before the end


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_models_batch_samplers_and_pag_in_the_hires_pass(kind):
    args = S.defaults().with_values({"yoda_enabled": True, "yoda_source": "unet", "pag_enabled": True,
                                     "yoda_show": True}).to_args()
    with a1111_host(kind) as h:
        h.load_script(SCRIPT)
        for sampler in ("Euler", "DDIM", "Heun"):
            res = h.txt2img(script_args=args, enable_hr=True, hr_scale=1.5, batch_size=2,
                            **{**T2I, "sampler_name": sampler, "steps": 4})
            assert not h.errors and len(res.images) == 4  # two images, two previews
        assert_no_leftovers(h)


def test_an_exception_mid_pass_leaves_nothing_behind(monkeypatch):
    init = photo("cheetah1.jpg")
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        yoda_io = importlib.import_module("lib_attn.methods.yoda.run")
        calls = {"n": 0}
        orig = yoda_io.YodaRun.blend_denoised

        def boom(self, d):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("boom")
            return orig(self, d)

        monkeypatch.setattr(yoda_io.YodaRun, "blend_denoised", boom)
        with pytest.raises(RuntimeError, match="boom"):  # not logged and dropped by the host's callback runner
            h.img2img(script_args=yoda_args(), init_images=[init], **BASE)
        assert_no_leftovers(h)
        monkeypatch.setattr(yoda_io.YodaRun, "blend_denoised", orig)
        res = h.img2img(script_args=yoda_args(), init_images=[init], **BASE)
        assert not h.errors and len(res.images) == 1


# ---------------------------------------------------------------------------------------------
# Forge double
# ---------------------------------------------------------------------------------------------
def test_forge_img2img_and_hires(monkeypatch, dino_models):
    from tests.fakes.forge_env import forge_host

    init = photo("cheetah2.jpg")
    with forge_host() as h:
        h.load_script(SCRIPT)
        point_models_at(monkeypatch, dino_models)
        seen, passes = spy(monkeypatch, "forge"), masks_of(monkeypatch)
        plain = h.img2img(init_images=[init], **BASE)
        on = h.img2img(init_images=[init], script_args=yoda_args(blur=0, source="dino-vits8"), **BASE)
        assert (on.samples - plain.samples).abs().max() > 1e-4
        assert check_outside_is_noised_source(seen, 1e-4) >= 3
        masks = [m for _, _, m, _ in passes[0]]
        assert torch.equal(masks[-1], torch.ones_like(masks[-1]))
        assert all(bool((b >= a).all()) for a, b in itertools.pairwise(masks))
        seen.clear()
        res = h.txt2img(script_args=yoda_args(show=True), enable_hr=True, hr_scale=1.5, batch_size=2,
                        **{**T2I, "steps": 4})
        assert seen and all(st["hr"] for st in seen)  # (Forge's hires pass here runs without uncond: hr_cfg 1)
        assert [i.mode for i in res.images].count("L") == 2  # one preview per image (after Forge's grid and images)
        with pytest.raises(S.SettingsError, match=r"yoda\.enabled"):
            h.txt2img(script_args=yoda_args(), **T2I)


def test_forge_an_exception_in_the_denoiser_callback_fails_the_generation(monkeypatch):
    """Forge's callback runner logs and drops exceptions too: one inside the input blend fails the generation with
    its cause, and nothing stays registered or patched."""
    from tests.fakes.forge_env import forge_host

    init = photo("cheetah1.jpg")
    with forge_host() as h:
        h.load_script(SCRIPT)
        yoda_io = importlib.import_module("lib_attn.methods.yoda.run")
        orig = yoda_io.YodaRun.blend_input

        def boom(self, *a):
            raise RuntimeError("boom")

        monkeypatch.setattr(yoda_io.YodaRun, "blend_input", boom)
        with pytest.raises(RuntimeError, match="boom"):
            h.img2img(init_images=[init], script_args=yoda_args(), **BASE)
        assert h.callback_count() == 0
        unet = h.sd_model.forge_objects_after_applying_lora.unet
        assert not getattr(unet, "_attn_toolkit_session", None)
        monkeypatch.setattr(yoda_io.YodaRun, "blend_input", orig)
        res = h.img2img(init_images=[init], script_args=yoda_args(), **BASE)
        assert len(res.images) == 1
