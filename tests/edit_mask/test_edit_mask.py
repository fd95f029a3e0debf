"""Automatic edit masks (InstDiffEdit): pure functions on built maps, then end to end on the A1111 and Forge
doubles (tiny real ldm UNet, real k-diffusion samplers)."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ldm.modules.attention import CrossAttention
from PIL import Image

from lib_attn import settings as S
from lib_attn.layers import keys_from_module_names
from lib_attn.methods.edit_mask import core as em
from tests.fakes.a1111_double import a1111_host, info_of
from tests.support.helpers import SCRIPT, assert_no_leftovers
from tests.support.images import photo
from tests.support.tiny import make_sd_model, make_unet

BASE = dict(prompt="a cat on a table", negative_prompt="", seed=5, steps=5, cfg_scale=5.0, width=96, height=80,
            sampler_name="Euler", denoising_strength=0.7)


def edit_args(**kw):
    return S.defaults().with_values({"edit_mask_enabled": True, **{f"edit_mask_{k}": v for k, v in kw.items()}}).to_args()


def words_of(prompt):
    return em.word_groups(em.prompt_pieces(prompt), lambda t: len(t.split()))


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------
def test_default_layers_are_the_lowest_resolution_encoder_and_decoder_layers():
    for kind, want in (("sd1", "input.7, input.8, output.3, output.4, output.5"),
                       ("sdxl", "input.7, input.8, output.0, output.1, output.2")):
        keys = keys_from_module_names(n for n, _ in make_unet(kind).named_modules())
        assert em.default_selector(keys) == want
        plan = em.build_plan(selector="auto", available=keys, threshold=0.2, object_sim=0.9, other_sim=0.6, grow=0,
                             blur=0, batch_average=False)
        assert plan.layers and all(k.attn == "attn2" for k in plan.layers)


def test_probabilities_are_the_modules_own_attention():
    """The head-averaged map we compute, split back per head and applied to V, gives the module's output."""
    torch.manual_seed(0)
    m = CrossAttention(query_dim=32, context_dim=24, heads=4, dim_head=8).double().eval()
    x, ctx = torch.randn(3, 20, 32, dtype=torch.float64), torch.randn(3, 77, 24, dtype=torch.float64)
    probs = em.cross_attention_probs(m, x, ctx)
    assert probs.shape == (3, 20, 77)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 20, dtype=torch.float32), atol=1e-5)
    # independent: per-head probabilities from an explicit softmax, mean over heads
    q, k = m.to_q(x), m.to_k(ctx)
    per_head = []
    for h in range(4):
        sl = slice(8 * h, 8 * h + 8)
        per_head.append(torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(8), dim=-1))
    assert torch.allclose(probs.double(), torch.stack(per_head).mean(0), atol=1e-6)
    # and those per-head maps are what the module attends with
    v = m.to_v(ctx)
    out = m.to_out(torch.cat([per_head[h] @ v[..., 8 * h: 8 * h + 8] for h in range(4)], dim=-1))
    assert torch.allclose(out, m(x, context=ctx), atol=1e-10)


@pytest.mark.parametrize(("hw", "n", "want"), [((10, 12), 30, (5, 6)), ((11, 9), 15, (6, 3)), ((11, 9), 9, (3, 3)),
                                               ((9, 7), 63, (9, 7)), ((13, 17), 4 * 5, (4, 5))])
def test_grid_of_odd_latents(hw, n, want):
    if n == 15:  # 11x9 -> 6x5 = 30 queries; 15 matches no level
        with pytest.raises(ValueError):
            em.grid_of(n, hw)
        return
    assert em.grid_of(n, hw) == want


def test_prompt_words_and_token_positions():
    pieces = em.prompt_pieces("(a red cat:1.2), <lora:x:0.8> on [a table] AND a dog")
    assert pieces == ["a", "red", "cat", ",", "on", "a", "table"]
    groups = em.word_groups(pieces, lambda t: 2 if t == "table" else 1)
    assert groups == [("a", [1]), ("red", [2]), ("cat", [3]), ("on", [5]), ("a", [6]), ("table", [7, 8])]
    assert em.word_groups(["w"] * 80, lambda t: 1)[-1][1] == [75]  # the first chunk only


def synthetic_maps(prompt, seed=0, hw=(16, 16), adds=15):
    """Cross-attention maps of the prompt (``a fluffy cat`` [``, table``]) over an image with a known object:
    the cat, an ellipse.  A second salient region (a table, a band at the bottom) is not the edit target.
    Logits per position: spatially smooth noise for every token; the start token soaks up the background and
    less of both salient regions (as in real maps, where it is low on every salient thing); "fluffy" and "cat"
    are high on the cat; "table", when in the prompt, on the table.  Probabilities are the softmax over the 77
    tokens; ``adds`` maps (layers x steps) are summed."""
    h, w = hw
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    cat = (((yy - 6) / 4.5) ** 2 + ((xx - 9) / 5) ** 2) <= 1
    table = yy >= 12
    pos = {word: ps[0] for word, ps in words_of(prompt)}
    g = torch.Generator().manual_seed(seed)
    sums = em.MapSum()
    for _ in range(adds):
        logits = em.gaussian_blur(torch.randn(77, 1, h, w, generator=g), 1.5)[:, 0].permute(1, 2, 0) * 2.5
        logits[..., 0] += torch.where(cat | table, 3.6, 4.0)
        logits[..., pos["fluffy"]] += torch.where(cat, 2.0, 0.0)
        logits[..., pos["cat"]] += torch.where(cat, 3.0, 0.0)
        if "table" in pos:
            logits[..., pos["table"]] += torch.where(table, 3.0, 0.0)
        sums.add(torch.softmax(logits, dim=-1).reshape(h * w, 77), hw)
    return sums, cat


def upsampled(region, size):
    return F.interpolate(region[None, None].float(), size=size, mode="nearest")[0, 0]


@pytest.mark.parametrize("prompt", ["a fluffy cat", "a fluffy cat, table"])
@pytest.mark.parametrize("seed", range(3))
def test_mask_iou_on_maps_with_a_known_object(prompt, seed):
    """The refined mask finds the object; the raw (inverted) start-token map also takes the table.

    The bar, 0.7: the object is an ellipse on the 16x16 attention grid (the paper's resolution for 512²) and the
    mask is made at the 32x32 latent after two 5x5 blurs; the exact ellipse itself, as the source map, scores
    0.80 after that pipeline (printed), so 0.7 leaves room for the noise and no more."""
    sums, cat = synthetic_maps(prompt, seed)
    groups = words_of(prompt)
    plan = em.EditMaskPlan(layers=(), threshold=0.2, grow=0, blur=0)
    b = em.MaskBuilder(plan, groups)
    b.sums = sums
    truth = upsampled(cat, (32, 32))
    refined = em.iou(b.mask((32, 32)), truth)
    _, bos_inv = em.token_maps(sums.mean(), [g for _, g in groups], (32, 32))
    raw = em.iou(em.finish(bos_inv, 0.2), truth)
    ceiling = em.iou(em.finish(F.interpolate(cat[None, None].float(), size=(32, 32), mode="bilinear")[0, 0], 0.2),
                     truth)
    print(f"IoU refined {refined:.3f}, raw start-token map {raw:.3f}, exact map {ceiling:.3f}, "
          f"roles {dict(zip([w for w, _ in groups], b.roles.tolist(), strict=True))}")
    assert b.object_words() == ["fluffy", "cat"]
    if "table" in prompt:
        assert b.roles[[w for w, _ in groups].index("table")] == -1  # subtracted
    assert refined >= 0.7
    assert refined > raw + 0.2


def test_roles_follow_the_similarity_thresholds():
    a = torch.zeros(3, 8, 8)
    a[0, :4] = 1  # anchor, like the inverted BOS map
    a[1, :4] = 1
    a[1, 0, 0] = 0.5  # nearly the same: object
    a[2, 4:] = 1  # disjoint: other
    roles = em.decide_roles(a, a[0].clone(), 0.9, 0.6)
    assert roles.tolist() == [1, 1, -1]
    src = em.mask_source(a, roles)
    assert src[4:].max() == 0 and src[:4].min() > 0.4


def test_finish_range_grow_and_blur():
    src = torch.zeros(20, 24)
    src[8:12, 10:14] = 1
    hard = em.finish(src, 0.5)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    grown = em.finish(src, 0.5, grow=2)
    assert grown.sum() > hard.sum() and bool((grown >= hard).all())
    soft = em.finish(src, 0.5, grow=0, blur=1.5)
    assert soft.min() >= 0 and soft.max() <= 1 and ((soft > 0) & (soft < 1)).any()


def test_blend_keeps_the_source_outside():
    x, s = torch.randn(2, 4, 5, 7), torch.randn(2, 4, 5, 7)
    m = (torch.rand(2, 1, 5, 7) > 0.5).float()
    out = em.blend(x, s, m)
    assert torch.equal(out[m.expand_as(x) == 0], s[m.expand_as(x) == 0])
    assert torch.allclose(out[m.expand_as(x) == 1], x[m.expand_as(x) == 1], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# end to end on the A1111 double
# ---------------------------------------------------------------------------------------------
def spy(monkeypatch):
    """What the edit mask did at each step: the model input rows after the blend, sigma, mask, source, noise.
    (Call inside the host: the adapter imports the host's modules.)"""
    import importlib

    hooks = importlib.import_module("lib_attn.methods.edit_mask.hooks_a1111").Hooks
    seen = []
    orig = hooks.input

    def wrapped(self, params, layout):
        out = orig(self, params, layout)
        if not out:
            return out
        run = self.run
        seen.append(dict(x=params.x.clone(), sigma=params.sigma.clone(), layout=layout,
                         mask=None if run.mask is None else run.mask.clone(), z0=run.z0, noise=run.noise))
        return out

    monkeypatch.setattr(hooks, "input", wrapped)
    return seen


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "Euler a"])
def test_outside_the_mask_the_latent_is_the_noised_source_at_every_step(monkeypatch, sampler):
    init = photo("cheetah1.jpg")
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        spy_ = spy(monkeypatch)
        finals = record_finals(monkeypatch)
        res = h.img2img(script_args=edit_args(blur=0, grow=0), init_images=[init], batch_size=2,
                        **{**BASE, "sampler_name": sampler})
        assert not h.errors
        assert_no_leftovers(h)
        z0 = spy_[0]["z0"]
        # the source is the img2img init latent; the noise is the one the sampler started from
        start_noise = h.modules.processing.create_noise([BASE["seed"], BASE["seed"] + 1], z0.shape[1:])
        assert torch.allclose(spy_[0]["noise"], start_noise.to(z0), atol=1e-6)
    steps_checked = 0
    for st in spy_[1:]:
        m = st["mask"]
        layout = st["layout"].with_groups([])
        for r in range(layout.n_cond + layout.n_images):
            i = layout.image_of_row(r)
            out = (m[i] == 0).expand_as(z0[i])
            want = z0[i] + st["noise"][i] * st["sigma"][r]
            assert out.any() and torch.allclose(st["x"][r][out], want[out], atol=1e-9)
        steps_checked += 1
    assert steps_checked >= 2
    # the result: the source exactly where the final mask is 0, the edit elsewhere
    final = finals[0]["mask"]
    out = (final == 0).expand_as(z0)
    assert out.any() and torch.allclose(res.samples[out], z0[out], atol=1e-9)
    assert (res.samples[~out] - z0[~out]).abs().max() > 1e-3


def record_finals(monkeypatch):
    """The mask and source of each batch when it ends (EditMaskRun is host-free)."""
    from lib_attn.methods.edit_mask import run as edit_mask_io

    finals = []
    orig = edit_mask_io.EditMaskRun.finish_batch

    def wrapped(self, size, *rest):
        finals.append(dict(mask=self.mask.clone(), z0=self.z0.clone(), size=size))
        return orig(self, size, *rest)

    monkeypatch.setattr(edit_mask_io.EditMaskRun, "finish_batch", wrapped)
    return finals


def test_mask_is_returned_at_image_size_and_pastes_as_an_img2img_mask():
    init = photo("cheetah2.jpg")
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        res = h.img2img(script_args=edit_args(), init_images=[init], **{**BASE, "width": 88, "height": 72})
        assert not h.errors
        assert len(res.images) == 2 and len(res.infotexts) == 2
        mask = res.images[1]
        assert mask.mode == "L" and mask.size == (88, 72)
        arr = np.asarray(mask)
        assert arr.max() == 255 and arr.min() < 255  # edited somewhere, kept somewhere
        assert "Edit mask threshold: 0.2" in res.infotexts[0]
        # the API returns it too, and it is accepted as the mask of a follow-up inpainting run
        buf = io.BytesIO()
        init.save(buf, format="PNG")
        b64 = base64.b64encode(buf.getvalue()).decode()
        payload = {**BASE, "width": 88, "height": 72, "init_images": [b64],
                   "alwayson_scripts": {S.TITLE: {"args": [{"edit_mask": {"threshold": 0.3}}]}}}
        code, body = h.api_img2img(payload)
        assert code == 200 and len(body["images"]) == 2
        api_mask = Image.open(io.BytesIO(base64.b64decode(body["images"][1])))
        assert api_mask.size == (88, 72)
        assert info_of(body)["extra_generation_params"]["Edit mask threshold"] == "0.3"
        follow = {**payload, "mask": body["images"][1], "alwayson_scripts": {}}
        code, body2 = h.api_img2img(follow)
        assert code == 200 and len(body2["images"]) == 1


def test_batch_masks_are_per_image_or_shared():
    init = photo("cheetah1.jpg")
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        own = h.img2img(script_args=edit_args(show=True), init_images=[init], batch_size=2, **BASE)
        shared = h.img2img(script_args=edit_args(batch_average=True), init_images=[init], batch_size=2, **BASE)
        hidden = h.img2img(script_args=edit_args(show=False), init_images=[init], batch_size=2, **BASE)
    m_own = [np.asarray(i, dtype=np.float32) for i in own.images[2:]]
    m_shared = [np.asarray(i, dtype=np.float32) for i in shared.images[2:]]
    assert len(m_own) == 2 and len(m_shared) == 2 and len(hidden.images) == 2
    assert np.abs(m_own[0] - m_own[1]).max() > 0  # different seeds, different maps
    assert np.array_equal(m_shared[0], m_shared[1])


def test_named_words_drive_the_mask_and_unknown_words_fail():
    init = photo("cheetah1.jpg")
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        a = h.img2img(script_args=edit_args(words="cat"), init_images=[init], **BASE)
        b = h.img2img(script_args=edit_args(words="table"), init_images=[init], **BASE)
        assert not h.errors
        assert np.abs(np.asarray(a.images[1], np.float32) - np.asarray(b.images[1], np.float32)).max() > 0
        with pytest.raises(S.SettingsError, match=r"edit_mask\.words.*dog not in the prompt"):
            h.img2img(script_args=edit_args(words="dog"), init_images=[init], **BASE)
        with pytest.raises(S.SettingsError, match=r"edit_mask\.enabled.*img2img"):
            h.txt2img(script_args=edit_args(), **{k: v for k, v in BASE.items() if k != "denoising_strength"})
        assert_no_leftovers(h)


@pytest.mark.parametrize("kind", ["sd1", "sdxl", "sd2"])
def test_models_samplers_and_pag_together(kind):
    init = photo("cheetah2.jpg")
    args = S.defaults().with_values({"edit_mask_enabled": True, "pag_enabled": True}).to_args()
    with a1111_host(kind) as h:
        h.load_script(SCRIPT)
        for sampler in ("Euler", "DDIM"):
            res = h.img2img(script_args=args, init_images=[init], **{**BASE, "sampler_name": sampler})
            assert not h.errors and len(res.images) == 2
        assert_no_leftovers(h)


def test_off_changes_nothing_and_on_changes_only_inside():
    init = photo("cheetah1.jpg")
    with a1111_host("sd1", dtype=torch.float64) as h:
        plain = h.img2img(init_images=[init], **BASE)
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        off = h.img2img(script_args=S.defaults().to_args(), init_images=[init], **BASE)
        on = h.img2img(script_args=edit_args(blur=0, grow=0), init_images=[init], **BASE)
    assert torch.equal(plain.samples, off.samples)
    assert (on.samples - plain.samples).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Forge double
# ---------------------------------------------------------------------------------------------
def test_forge_masks_blend_and_output(monkeypatch):
    from tests.fakes.forge_env import forge_host

    init = photo("cheetah1.jpg")
    args = S.defaults().with_values({"edit_mask_enabled": True, "edit_mask_blur": 0, "edit_mask_grow": 0,
                                     "pag_enabled": True}).to_args()
    with forge_host("sd1") as h:
        plain = h.img2img(**BASE, init_images=[init], batch_size=2).samples
        h.load_script(SCRIPT)
        finals = record_finals(monkeypatch)
        res = h.img2img(**BASE, init_images=[init], batch_size=2, script_args=args)
        assert h.callback_count() == 0
        with pytest.raises(S.SettingsError, match=r"edit_mask\.words"):
            h.img2img(**BASE, init_images=[init], script_args=edit_args(words="dog"))
    masks = res.images[-2:]  # after the grid and the two images
    assert len(res.images) == 5 and all(m.mode == "L" and m.size == (96, 80) for m in masks)
    final, z0 = finals[0]["mask"], finals[0]["z0"]
    out = (final == 0).expand_as(z0)
    assert out.any() and (~out).any()
    assert torch.allclose(res.samples[out], z0[out], atol=1e-5)  # the source where the mask is 0
    assert (res.samples[~out] - plain[~out]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# the final inpainting pass, and the mask with colorization
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inpainting_model", [False, True])
def test_final_inpainting_pass_runs_the_hosts_inpainting_with_the_final_mask(monkeypatch, inpainting_model):
    """The second pass is the host's own img2img with ``p.mask``/``p.nmask`` from the final mask: outside it the
    result is the init latent exactly, inside it differs from the blend-only result; an inpainting checkpoint gets
    the host's inpainting conditioning (the mask and the masked init image)."""
    init = photo("cheetah1.jpg")
    models = {"inpaint": lambda: make_sd_model("sd1", inpainting=True)} if inpainting_model else None
    with a1111_host("sd1", dtype=torch.float64, models=models) as h:
        if inpainting_model:
            sd_models = h.modules.sd_models
            sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match("inpaint"))
        h.load_script(SCRIPT)
        finals = record_finals(monkeypatch)
        conds = []
        cls = h.modules.processing.StableDiffusionProcessingImg2Img
        orig = cls.img2img_image_conditioning

        def spy_ic(self, source, latent, image_mask=None, round_image_mask=True):
            out = orig(self, source, latent, image_mask, round_image_mask)
            conds.append((image_mask, out))
            return out

        monkeypatch.setattr(cls, "img2img_image_conditioning", spy_ic)
        blend = h.img2img(script_args=edit_args(blur=0, grow=0), init_images=[init], batch_size=2, **BASE)
        inpaint = h.img2img(script_args=edit_args(blur=0, grow=0, final="inpaint"), init_images=[init],
                            batch_size=2, **BASE)
        assert not h.errors
        assert_no_leftovers(h)
        assert "Edit mask final: inpaint" in inpaint.infotexts[0]
    m, z0 = finals[-1]["mask"], finals[-1]["z0"]
    assert torch.equal(finals[0]["mask"], m)  # the same edit pass, so the same mask
    out = (m == 0).expand_as(z0)
    assert out.any() and (~out).any()
    assert torch.allclose(inpaint.samples[out], z0[out], atol=1e-9)
    assert (inpaint.samples[~out] - blend.samples[~out]).abs().max() > 1e-3
    # the inpainting pass asked the host for conditioning with the mask at image size (1 = edited)
    image_mask, ic = conds[-1]
    assert torch.is_tensor(image_mask) and image_mask.shape == (2, 1, BASE["height"], BASE["width"])
    assert torch.equal(F.interpolate(image_mask, size=m.shape[-2:]), m.to(image_mask))
    if inpainting_model:
        assert ic.shape[1] == 5 and torch.equal(ic[:, :1], m.to(ic))
    # and the generation after it is plain again
    assert len(inpaint.images) == 4


def test_edit_mask_limits_colorization_to_the_mask(monkeypatch):
    """Both on in one img2img: the colour transfer acts only inside the mask; outside it, the result is the gray
    input's latent exactly (the tiny model's stand-in VAE cannot show colours, so this is checked on latents)."""
    from tests.support.images import small

    init, ref = small("cheetah1.jpg"), photo("lion.jpg")
    kw = {**BASE, "prompt": "a cheetah", "cfg_scale": 3.0}
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        finals = record_finals(monkeypatch)
        both = h.img2img(script_args=[{"colorize": {"reference": ref}, "edit_mask": {"blur": 0, "grow": 0}}],
                         init_images=[init], **kw)
        colour = h.img2img(script_args=[{"colorize": {"reference": ref}}], init_images=[init], **kw)
        assert not h.errors
        assert_no_leftovers(h)
    m, z0 = finals[0]["mask"], finals[0]["z0"]
    out = (m == 0).expand_as(z0)
    assert out.any() and (~out).any() and len(both.images) == 2
    assert torch.allclose(both.samples[out], z0[out], atol=1e-9)  # the gray input, untouched
    assert (colour.samples[out] - z0[out]).abs().max() > 1e-3  # where colorization alone would have acted
    assert (both.samples[~out] - z0[~out]).abs().max() > 1e-3


def test_forge_final_inpainting_pass(monkeypatch):
    from tests.fakes.forge_env import forge_host

    init = photo("cheetah2.jpg")
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        finals = record_finals(monkeypatch)
        blend = h.img2img(**BASE, init_images=[init], script_args=edit_args(blur=0, grow=0))
        res = h.img2img(**BASE, init_images=[init], script_args=edit_args(blur=0, grow=0, final="inpaint"))
        assert h.callback_count() == 0
        again = h.img2img(**BASE, init_images=[init], script_args=edit_args(blur=0, grow=0))
    m, z0 = finals[1]["mask"], finals[1]["z0"]
    out = (m == 0).expand_as(z0)
    assert out.any() and (~out).any()
    assert torch.allclose(res.samples[out], z0[out], atol=1e-5)
    assert (res.samples[~out] - blend.samples[~out]).abs().max() > 1e-3
    assert torch.equal(again.samples, blend.samples)  # nothing of the inpainting pass carried over


def test_no_maps_fails_loudly(monkeypatch):
    """If the mask layers never see a cross-attention call (e.g. another extension replaced the attention
    modules), the generation fails with a message naming the layers field instead of running without a mask."""
    init = photo("cheetah1.jpg")
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        from lib_attn.methods.edit_mask.hooks_a1111 import Hooks

        monkeypatch.setattr(Hooks, "_attn2",
                            lambda self, module, call_next, *a, **kw: call_next(*a, **kw))
        with pytest.raises(S.SettingsError, match=r"edit_mask\.layers.*no cross-attention map"):
            h.img2img(script_args=edit_args(), init_images=[init], **BASE)
        assert_no_leftovers(h)


# ---------------------------------------------------------------------------------------------
# closer to the paper: bicubic map resizing, several noise draws (seeds)
# ---------------------------------------------------------------------------------------------
def pil_bicubic(m, out_hw):
    """The official code's resize: ``PIL.Image.resize`` with its default (bicubic) filter, here on a float image."""
    img = Image.fromarray(m.numpy().astype(np.float32), mode="F").resize(out_hw[::-1], Image.BICUBIC)
    return torch.from_numpy(np.array(img))


@pytest.mark.parametrize(("hw", "out"), [((16, 16), (64, 64)), ((10, 12), (80, 96)), ((5, 7), (11, 13)),
                                         ((16, 16), (7, 9))])
def test_bicubic_resize_is_the_official_pil_resize(hw, out):
    m = torch.rand(hw, generator=torch.Generator().manual_seed(1))
    ours = em.resize_bicubic(m, out)
    assert torch.allclose(ours, pil_bicubic(m, out), atol=1e-6)
    # PIL's kernel (a = -0.5, taps outside the image dropped) is not torch's (a = -0.75, border replicated)
    torch_bicubic = F.interpolate(m[None, None], size=out, mode="bicubic", align_corners=False)[0, 0]
    assert (ours - torch_bicubic).abs().max() > 1e-3
    # it overshoots [0, 1] on sharp maps: token_maps clips, as the 8-bit image does
    sharp = (torch.rand(hw, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    up = em.resize_bicubic(sharp, out)
    assert up.min() < 0 or up.max() > 1


def test_token_maps_follow_the_official_steps():
    """Independently, as the official ``token_combination``: each map over its maximum, resized by PIL bicubic,
    clipped to [0, 1] (its 8-bit image), the start token's inverted, every map min-max normalized."""
    sums, _ = synthetic_maps("a fluffy cat, table")
    mean = sums.mean()
    groups = [g for _, g in words_of("a fluffy cat, table")]
    words, bos = em.token_maps(mean, groups, (64, 64))
    maps = [mean[0]] + [mean[g].mean(0) for g in groups]
    ref = []
    for i, m in enumerate(maps):
        r = pil_bicubic(m / m.max(), (64, 64)).clamp(0, 1)
        r = 1 - r if i == 0 else r
        ref.append((r - r.min()) / (r.max() - r.min()))
    assert torch.allclose(bos, ref[0], atol=1e-5)
    assert torch.allclose(words, torch.stack(ref[1:]), atol=1e-5)
    # the bilinear resize it replaced gives other maps
    scaled = torch.stack(maps[1:]) / torch.stack(maps[1:]).amax((-2, -1), keepdim=True)
    bilinear = F.interpolate(scaled[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
    bilinear = (bilinear - bilinear.amin((-2, -1), keepdim=True)) / (
        bilinear.amax((-2, -1), keepdim=True) - bilinear.amin((-2, -1), keepdim=True))
    assert (words - bilinear).abs().max() > 1e-2


def test_extra_draws_are_seeded_and_independent():
    a = em.draw_noise([5, 6], (4, 3, 2), 3)
    assert a.shape == (2, 2, 4, 3, 2)
    assert torch.equal(a, em.draw_noise([5, 6], (4, 3, 2), 3))
    assert torch.equal(a[:1], em.draw_noise([5, 6], (4, 3, 2), 2))  # draw k does not depend on how many
    assert em.draw_noise([5], (4, 3, 2), 1).shape[0] == 0
    flat = a.reshape(4, -1)
    corr = torch.corrcoef(flat)
    assert (corr - torch.eye(4)).abs().max() < 0.6  # four different draws
    # never another image's seed: image 5's draw 1 is not the host's noise of image 6 (seed + 1)
    host_noise = torch.randn((4, 3, 2), generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a[0, 0], host_noise)


def test_redrawn_inputs_swap_the_noise():
    g = torch.Generator().manual_seed(3)
    z0, n, draws = torch.randn(2, 4, 6, 5, generator=g), torch.randn(2, 4, 6, 5, generator=g), em.draw_noise([1, 2], (4, 6, 5), 3)
    sigma = torch.tensor([2.0, 2.0]).view(-1, 1, 1, 1)
    mask = torch.zeros(2, 1, 6, 5)
    mask[..., 2:4, 1:3] = 1
    edit = torch.randn(2, 4, 6, 5, generator=g)
    x = em.blend(edit, z0 + sigma * n, mask)  # the step's input: the source (noised) outside the mask
    rows = em.redrawn_inputs(x, z0 + sigma * n, torch.stack([z0 + sigma * d for d in draws]))
    assert rows.shape == (4, 4, 6, 5)
    for k in range(2):
        for i in range(2):
            r, out = rows[k * 2 + i], (mask[i] == 0).expand(4, 6, 5)
            assert torch.allclose(r[out], (z0[i] + 2 * draws[k, i])[out], atol=1e-6)  # the official seed-k latent
            inside = ~out
            assert torch.allclose(r[inside], (x[i] + 2 * (draws[k, i] - n[i]))[inside], atol=1e-6)


def test_seeds_average_the_maps_of_independent_draws():
    """Feeding every draw's maps into one builder (as the hosts do, interleaved) gives the average of the per-draw
    mean maps (each draw adds as many), and its mask is the one those averaged maps make."""
    prompt = "a fluffy cat, table"
    t = 77

    def one_map(seed):
        total = synthetic_maps(prompt, seed=seed, adds=1)[0].total  # (T, h, w) of one softmax
        return total.reshape(t, -1).t()

    draws = [[one_map(100 * k + step) for step in range(6)] for k in range(3)]
    builder = em.MaskBuilder(em.EditMaskPlan(layers=(), grow=0, blur=0, seeds=3), words_of(prompt))
    for step in range(6):
        for k in range(3):
            builder.sums.add(draws[k][step], (16, 16))
    per_draw = []
    for maps in draws:
        s = em.MapSum()
        for m in maps:
            s.add(m, (16, 16))
        per_draw.append(s.mean())
    want = torch.stack(per_draw).mean(0)
    assert torch.allclose(builder.sums.mean(), want, atol=1e-6)
    groups = [g for _, g in words_of(prompt)]
    words, bos = em.token_maps(want, groups, (32, 32))
    roles = em.decide_roles(words, bos, 0.9, 0.6, [w for w, _ in words_of(prompt)])
    assert torch.allclose(builder.mask((32, 32)), em.finish(em.mask_source(words, roles), 0.2, 0, 0))
    # and it is not any single draw's mask
    single = em.MaskBuilder(em.EditMaskPlan(layers=(), grow=0, blur=0), words_of(prompt))
    for m in draws[0]:
        single.sums.add(m, (16, 16))
    assert not torch.equal(single.mask((32, 32)), builder.mask((32, 32)))


def count_adds(monkeypatch):
    from lib_attn.methods.edit_mask import run as edit_mask_io

    adds = []
    orig = edit_mask_io.EditMaskRun.add

    def wrapped(self, image, probs, hw):
        adds.append(image)
        return orig(self, image, probs, hw)

    monkeypatch.setattr(edit_mask_io.EditMaskRun, "add", wrapped)
    return adds


def test_a1111_seeds_ride_as_redrawn_rows(monkeypatch):
    """Seeds 3: each step's call holds 2 more rows per image, the step's input with the noise swapped for draws 1
    and 2 of the image's seed (outside the mask exactly the source noised with that draw), and every row's maps
    count; Seeds 1 inserts nothing."""
    import importlib

    init = photo("cheetah1.jpg")
    with a1111_host("sd1", dtype=torch.float64) as h:
        h.load_script(SCRIPT)
        hooks = importlib.import_module("lib_attn.methods.edit_mask.hooks_a1111").Hooks
        seen = []
        orig = hooks.rows

        def rows(self, params, layout):
            groups, capture = orig(self, params, layout)
            run = self.run
            seen.append(dict(groups=groups, mask=None if run.mask is None else run.mask.clone(), z0=run.z0,
                             draws=run.draws, sigma=params.sigma[list(layout.first_cond)].clone()))
            return groups, capture

        monkeypatch.setattr(hooks, "rows", rows)
        adds = count_adds(monkeypatch)
        one = h.img2img(script_args=edit_args(blur=0, grow=0), init_images=[init], batch_size=2, **BASE)
        n_one, seen_one = len(adds), list(seen)
        adds.clear()
        seen.clear()
        three = h.img2img(script_args=edit_args(blur=0, grow=0, seeds=3), init_images=[init], batch_size=2, **BASE)
        assert not h.errors
        assert_no_leftovers(h)
    assert seen_one and all(s["groups"] == [] for s in seen_one) and n_one > 0
    assert len(adds) == 3 * n_one
    want = em.draw_noise([BASE["seed"], BASE["seed"] + 1], seen[0]["z0"].shape[1:], 3).to(seen[0]["z0"])
    assert torch.equal(seen[0]["draws"], want)
    checked = 0
    for st in seen:
        ((name, src, given),) = st["groups"]
        assert name == "edit_mask_seeds" and src == [0, 1, 0, 1]
        x, z0, sigma = given["x"], st["z0"], st["sigma"]
        assert x.shape[0] == 4 and torch.equal(given["sigma"], sigma.repeat(2))
        for k in range(2):
            for i in range(2):
                out = torch.ones_like(z0[i], dtype=torch.bool) if st["mask"] is None else (
                    st["mask"][i] == 0).expand_as(z0[i])
                noised = z0[i] + want[k, i] * sigma[i]
                assert out.any() and torch.allclose(x[2 * k + i][out], noised[out], atol=1e-9)
                checked += 1
    assert checked >= 8
    assert len(three.images) == len(one.images) == 4


def test_forge_seeds_run_extra_draw_calls(monkeypatch):
    from tests.fakes.forge_env import forge_host

    init = photo("cheetah1.jpg")
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        finals = record_finals(monkeypatch)
        adds = count_adds(monkeypatch)
        h.img2img(**BASE, init_images=[init], batch_size=2, script_args=edit_args(blur=0, grow=0))
        n_one = len(adds)
        adds.clear()
        res = h.img2img(**BASE, init_images=[init], batch_size=2, script_args=edit_args(blur=0, grow=0, seeds=2))
        assert h.callback_count() == 0
    assert n_one > 0 and len(adds) == 2 * n_one
    final, z0 = finals[-1]["mask"], finals[-1]["z0"]
    out = (final == 0).expand_as(z0)
    assert out.any() and torch.allclose(res.samples[out], z0[out], atol=1e-5)
    assert "Edit mask seeds: 2" in res.infotexts[0]


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_seeds_with_timestep_samplers_and_pag(kind):
    """The draws' rows ride along PAG's and work with DDIM's timestep noising (sqrt(a) z + sqrt(1 - a) noise)."""
    init = photo("cheetah2.jpg")
    args = S.defaults().with_values({"edit_mask_enabled": True, "edit_mask_seeds": 2, "pag_enabled": True}).to_args()
    with a1111_host(kind) as h:
        h.load_script(SCRIPT)
        for sampler in ("Euler", "DDIM"):
            res = h.img2img(script_args=args, init_images=[init], batch_size=2, **{**BASE, "sampler_name": sampler})
            assert not h.errors and len(res.images) == 4
        assert_no_leftovers(h)
