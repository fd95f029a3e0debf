"""YODA core: coverage schedule, nested masks, feather, blend, map resizing, and DINO [CLS] attention
on random-init transformers ViTModels (no weights are downloaded)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lib_attn.methods.yoda import core as Y
from lib_attn.methods.yoda import dino
from tests.support.vit import tiny_vit

SCHEDULES = [
    Y.YodaPlan(start_coverage=0.25, gamma=1.0),
    Y.YodaPlan(start_coverage=0.0, gamma=2.0),
    Y.YodaPlan(start_coverage=0.1, gamma=0.5),
    Y.YodaPlan(start_coverage=0.6, gamma=3.0, threshold=0.8),
    Y.YodaPlan(start_coverage=0.0, gamma=1.0, threshold=0.5),
]


def random_maps(b: int = 3, h: int = 13, w: int = 17) -> torch.Tensor:
    # smooth-ish maps with a different range per image (normalization must be per image)
    a = torch.rand(b, 1, h // 2 + 1, w // 2 + 1)
    a = F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False) + 0.05 * torch.rand(b, 1, h, w)
    return a * torch.tensor([1.0, 7.0, 0.01][:b]).view(b, 1, 1, 1) + torch.tensor([0.0, -3.0, 5.0][:b]).view(b, 1, 1, 1)


# ---------------------------------------------------------------- schedule


def test_coverage_schedule_values():
    assert Y.coverage_threshold(0.0, 0.25, 1.0) == 0.25
    assert Y.coverage_threshold(1.0, 0.25, 1.0) == 1.0
    assert Y.coverage_threshold(0.5, 0.25, 1.0) == pytest.approx(0.625)
    assert Y.coverage_threshold(0.5, 0.2, 2.0) == pytest.approx(0.2 + 0.8 * 0.25)
    assert Y.coverage_threshold(0.5, 0.2, 0.5) == pytest.approx(0.2 + 0.8 * math.sqrt(0.5))
    for c0, g in [(0.0, 1.0), (0.3, 0.4), (0.9, 5.0)]:
        vals = [Y.coverage_threshold(s / 50, c0, g) for s in range(51)]
        assert all(a <= b for a, b in itertools.pairwise(vals))
        assert vals[0] == c0 and vals[-1] == 1.0


def test_progress_ends():
    assert Y.progress(0, 10, single=1.0) == 0.0
    assert Y.progress(9, 10, single=1.0) == 1.0
    assert Y.progress(3, 7, single=1.0) == pytest.approx(0.5)
    assert Y.progress(0, 1, single=1.0) == 1.0  # a one-step pass is its own last step


@pytest.mark.parametrize("plan", SCHEDULES)
def test_masks_nested_and_full_at_last_step(plan):
    maps = random_maps()
    total = 12
    masks = [Y.mask_at(maps, i, total, plan) for i in range(total)]
    for m in masks:
        assert m.shape == (3, 1, 13, 17)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
    for a, b in itertools.pairwise(masks):
        assert torch.all(a <= b)  # a pixel once in stays in
    assert torch.equal(masks[-1], torch.ones_like(masks[-1]))
    # coverage grows: the last-but-one mask is not yet full for these continuous maps
    assert masks[-2].mean() < 1.0


@pytest.mark.parametrize("c0", [0.0, 0.1, 0.25, 0.5, 0.9])
def test_first_step_covers_start_fraction_of_top_scores(c0):
    maps = random_maps()
    n = 13 * 17
    m = Y.mask_at(maps, 0, 20, Y.YodaPlan(start_coverage=c0))
    per_image = m.flatten(1).sum(1)
    assert per_image.tolist() == [float(math.floor(c0 * n + 0.5))] * 3  # rounded half up
    # the covered pixels are the highest-scoring ones of each image
    for b in range(3):
        inside, outside = maps[b][m[b] > 0], maps[b][m[b] == 0]
        if inside.numel() and outside.numel():
            assert inside.min() > outside.max()


def test_coverage_follows_schedule_at_every_step():
    maps = random_maps()
    n = 13 * 17
    plan = Y.YodaPlan(start_coverage=0.2, gamma=2.0)
    for i in range(10):
        got = Y.mask_at(maps, i, 10, plan).flatten(1).mean(1)
        want = 0.2 + 0.8 * (i / 9) ** 2
        assert torch.allclose(got, torch.full_like(got, want), atol=0.5 / n + 1e-9)


def test_threshold_pixels_in_from_the_start():
    maps = random_maps()
    norm = Y.normalize_map(maps)
    plan = Y.YodaPlan(start_coverage=0.0, threshold=0.7)
    m0 = Y.mask_at(maps, 0, 8, plan)
    assert torch.equal(m0, (norm >= 0.7).float())
    assert 0 < m0.sum() < m0.numel()
    # no threshold, zero start coverage: nothing at the first step
    assert Y.mask_at(maps, 0, 8, Y.YodaPlan(start_coverage=0.0)).sum() == 0
    # threshold adds to the quantile cut, never removes
    both = Y.mask_at(maps, 0, 8, Y.YodaPlan(start_coverage=0.3, threshold=0.7))
    quant = Y.mask_at(maps, 0, 8, Y.YodaPlan(start_coverage=0.3))
    assert torch.equal(both, torch.maximum(quant, m0))


def test_mask_invariant_to_map_scale_and_per_image():
    maps = random_maps()
    plan = Y.YodaPlan(start_coverage=0.3, threshold=0.9)
    whole = Y.mask_at(maps, 2, 6, plan)
    assert torch.equal(whole, Y.mask_at(maps * 3.0 + 2.0, 2, 6, plan))
    for b in range(3):
        assert torch.equal(whole[b : b + 1], Y.mask_at(maps[b : b + 1, 0], 2, 6, plan))


def test_constant_map_normalizes_to_ones_and_is_fully_covered():
    flat = torch.full((2, 1, 5, 6), 3.5)
    assert torch.equal(Y.normalize_map(flat), torch.ones_like(flat))
    assert torch.equal(Y.mask_at(flat, 0, 10, Y.YodaPlan(start_coverage=0.1)), torch.ones(2, 1, 5, 6))


def test_normalize_map_per_image_range():
    maps = random_maps()
    out = Y.normalize_map(maps)
    assert out.shape == maps.shape
    flat = out.flatten(1)
    assert torch.equal(flat.amin(1), torch.zeros(3)) and torch.equal(flat.amax(1), torch.ones(3))
    # order within an image is kept
    assert torch.equal(maps[1].flatten().argsort(), out[1].flatten().argsort())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(start_coverage=-0.1),
        dict(start_coverage=1.5),
        dict(gamma=0.0),
        dict(gamma=float("nan")),
        dict(threshold=1.2),
        dict(blur=-1.0),
        dict(source="clip"),
    ],
)
def test_plan_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        Y.YodaPlan(**kwargs)


# ---------------------------------------------------------------- feather


def test_feather_zero_is_identity_and_ones_stay_ones():
    m = Y.mask_at(random_maps(), 3, 10, Y.YodaPlan())
    assert torch.equal(Y.feather(m, 0), m)
    ones = torch.ones(2, 1, 9, 11)
    assert torch.equal(Y.feather(ones, 2.5), ones)


def test_feather_of_a_point_is_a_gaussian_and_keeps_the_point():
    m = torch.zeros(1, 1, 21, 21)
    m[0, 0, 10, 10] = 1.0
    sigma = 1.5
    out = Y.feather(m, sigma)
    assert out[0, 0, 10, 10] == 1.0
    r = math.ceil(3 * sigma)
    g = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-r, r + 1)]
    norm = sum(g) ** 2
    for dy, dx in [(0, 1), (1, 1), (2, -3), (-4, 0), (3, 3)]:
        want = g[dy + r] * g[dx + r] / norm
        assert out[0, 0, 10 + dy, 10 + dx].item() == pytest.approx(want, rel=1e-5)
    assert out[0, 0, 10, 10 + r + 1] == 0.0  # outside the kernel radius
    assert torch.equal(out[0, 0], out[0, 0].T) and torch.equal(out[0, 0], out[0, 0].flip(0))


def test_feather_edges_replicate_not_wrap():
    m = torch.zeros(1, 1, 9, 21)
    m[..., 0] = 1.0  # the left column
    sigma = 1.5
    out = Y.feather(m, sigma)
    r = math.ceil(3 * sigma)
    g = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-r, r + 1)]
    # column 1 reads column 0 through the offsets -1..-r (clamped at the border): weight sum(g[:r])
    assert torch.allclose(out[..., 1], torch.full((1, 1, 9), sum(g[:r]) / sum(g)), atol=1e-6)
    assert torch.equal(out[..., -1], torch.zeros(1, 1, 9))  # nothing wraps round to the right edge


@pytest.mark.parametrize("plan", SCHEDULES)
@pytest.mark.parametrize("blur", [0.7, 2.0, 4.0])
def test_feather_keeps_masks_nested_and_in_range(plan, blur):
    maps = random_maps()
    total = 9
    soft = [Y.feather(Y.mask_at(maps, i, total, plan), blur) for i in range(total)]
    for i, s in enumerate(soft):
        hard = Y.mask_at(maps, i, total, plan)
        assert s.min() >= 0.0 and s.max() <= 1.0
        assert torch.all(s[hard > 0] == 1.0)  # the diffused region stays fully diffused
    for a, b in itertools.pairwise(soft):
        assert torch.all(a <= b)
    assert torch.equal(soft[-1], torch.ones_like(soft[-1]))
    # the feather actually softens something somewhere before the end
    assert any(((s > 0) & (s < 1)).any() for s in soft[:-1])


def test_feather_preserves_order_of_arbitrary_nested_masks():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        small = (torch.rand(2, 1, 15, 12, generator=g) > 0.7).float()
        big = torch.maximum(small, (torch.rand(2, 1, 15, 12, generator=g) > 0.6).float())
        assert torch.all(Y.feather(small, 1.3) <= Y.feather(big, 1.3))


def test_plan_mask_at_is_feathered_mask():
    maps = random_maps()
    plan = Y.YodaPlan(start_coverage=0.2, gamma=1.5, blur=1.0)
    assert torch.equal(plan.mask_at(maps, 2, 7), Y.feather(Y.mask_at(maps, 2, 7, plan), 1.0))


# ---------------------------------------------------------------- blend


def test_blend_exact_outside_and_inside():
    x = torch.randn(2, 4, 13, 17) * 3
    low = torch.randn(2, 4, 13, 17) * 1e7  # large values: the naive formula would round at mask = 1
    mask = Y.mask_at(random_maps(2), 1, 5, Y.YodaPlan(start_coverage=0.4))
    out = Y.blend(x, low, mask)
    m = mask.expand_as(x) > 0
    assert torch.equal(out[~m], low[~m])
    assert torch.equal(out[m], x[m])
    assert 0 < m.sum() < m.numel()


def test_blend_soft_mask_is_linear_mix():
    x, low = torch.randn(1, 4, 6, 7), torch.randn(1, 4, 6, 7)
    mask = torch.rand(1, 1, 6, 7)
    assert torch.allclose(Y.blend(x, low, mask), low + mask * (x - low), atol=1e-6)


# ---------------------------------------------------------------- resize


def test_resize_map_odd_latent_size_keeps_orientation_and_range():
    a = torch.zeros(2, 5, 7)
    a[0, 0, 0] = 1.0  # hot upper-left corner
    a[1, 4, 6] = 1.0  # hot lower-right corner
    r = Y.resize_map(a, (13, 17))
    assert r.shape == (2, 1, 13, 17)
    assert r.min() >= 0.0 and r.max() <= 1.0
    top_left = r[0, 0, :6, :8].sum()
    assert top_left > 0.9 * r[0].sum()
    assert r[1, 0, 7:, 9:].sum() > 0.9 * r[1].sum()
    # a horizontal ramp stays a non-decreasing ramp in x and constant in y
    ramp = torch.linspace(0, 1, 7).expand(1, 5, 7)
    rr = Y.resize_map(ramp, (13, 17))[0, 0]
    assert torch.all(rr[:, 1:] >= rr[:, :-1] - 1e-6)
    assert torch.allclose(rr, rr[:1].expand_as(rr), atol=1e-6)
    # shrinking, and the same size
    assert Y.resize_map(torch.rand(1, 1, 56, 40), (13, 9)).shape == (1, 1, 13, 9)
    same = torch.rand(1, 13, 17)
    assert torch.equal(Y.resize_map(same, (13, 17))[:, 0], same)


# ---------------------------------------------------------------- DINO


def hand_cls_attention(model, pixel_values):
    """Last layer's [CLS] attention from the model's own weights: capture the last block's input, apply
    its pre-attention LayerNorm and the query/key weights by hand, softmax per head."""
    layer = model.encoder.layer[-1]
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(pixel_values=pixel_values, interpolate_pos_encoding=True)
    handle.remove()
    (h,) = seen
    ln = layer.layernorm_before
    h = F.layer_norm(h, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    sa = layer.attention.attention
    q = h @ sa.query.weight.T + sa.query.bias
    k = h @ sa.key.weight.T + sa.key.bias
    heads = model.config.num_attention_heads
    d = model.config.hidden_size // heads
    b, n, _ = h.shape
    q = q.view(b, n, heads, d).permute(0, 2, 1, 3)
    k = k.view(b, n, heads, d).permute(0, 2, 1, 3)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return probs[:, :, 0, 1:].mean(1)


def test_dino_map_shape_and_normalization():
    model = tiny_vit()
    pv = torch.randn(2, 3, 40, 56)
    a = dino.cls_attention(model, pv)
    assert a.shape == (2, 5, 7) and a.dtype == torch.float32
    for b in range(2):
        assert a[b].min() == 0.0 and a[b].max() == 1.0
    # not multiples of the patch: resized to the nearest multiple (45 -> 48, 61 -> 64)
    assert dino.cls_attention(model, torch.randn(1, 3, 45, 61)).shape == (1, 6, 8)


def test_dino_matches_hand_computation_and_transformers_eager():
    model = tiny_vit()
    pv = torch.randn(2, 3, 40, 56)
    raw = dino.cls_attention(model, pv, normalize=False)
    hand = hand_cls_attention(model, pv).reshape(2, 5, 7)
    assert raw.std() > 1e-3  # far from uniform, so a mix-up would show
    assert torch.allclose(raw, hand, atol=1e-5, rtol=0)
    assert torch.allclose(dino.cls_attention(model, pv), Y.normalize_map(hand), atol=1e-5, rtol=0)
    # transformers' own attention probabilities (eager, output_attentions)
    eager = tiny_vit()
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(pixel_values=pv, output_attentions=True, interpolate_pos_encoding=True)
    ref = out.attentions[-1][:, :, 0, 1:].mean(1).reshape(2, 5, 7)
    assert torch.allclose(raw, ref, atol=1e-5, rtol=0)


def test_dino_works_under_sdpa_and_leaves_the_model_alone():
    model = tiny_vit()
    impl = model.config._attn_implementation
    hooks = len(model.encoder.layer[-1].attention.attention._forward_pre_hooks)
    pv = torch.randn(1, 3, 32, 48)
    a = dino.cls_attention(model, pv, normalize=False)
    assert model.config._attn_implementation == impl
    assert len(model.encoder.layer[-1].attention.attention._forward_pre_hooks) == hooks
    assert torch.allclose(a, hand_cls_attention(model, pv).reshape(1, 4, 6), atol=1e-5, rtol=0)


def test_dino_grid_is_row_major():
    # zero position embeddings: identical patches give identical tokens and identical [CLS] weights,
    # so one odd patch must light up exactly its own cell of the (non-square) grid
    model = tiny_vit()
    with torch.no_grad():
        model.embeddings.position_embeddings.zero_()
    pv = torch.zeros(1, 3, 40, 56)
    pv[:, :, 8:16, 40:48] = torch.randn(3, 8, 8) * 2  # patch row 1, column 5
    a = dino.cls_attention(model, pv, normalize=False)[0]
    odd = a[1, 5]
    rest = torch.cat([a.flatten()[: 1 * 7 + 5], a.flatten()[1 * 7 + 6 :]])
    assert torch.allclose(rest, rest[:1].expand_as(rest), atol=1e-7)
    assert (odd - rest[0]).abs() > 1e-4


def test_preprocess_sizes_and_normalization():
    img = torch.rand(2, 3, 40, 56)
    pv = dino.preprocess(img, 8)
    assert pv.shape == (2, 3, 40, 56)
    mean = torch.tensor(dino.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(dino.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(pv, (img - mean) / std, atol=1e-6)
    # non-multiples round to the nearest multiple; the long side is capped, aspect kept
    assert dino.preprocess(torch.rand(1, 3, 45, 61), 8).shape[-2:] == (48, 64)
    assert dino.preprocess(torch.rand(1, 3, 600, 1000), 8).shape[-2:] == (272, 448)
    assert dino.preprocess(torch.rand(1, 3, 1000, 600), 16, max_side=224).shape[-2:] == (224, 128)
    assert dino.preprocess(torch.rand(1, 3, 3, 3), 8).shape[-2:] == (8, 8)
    # a mid-gray image of the ImageNet mean is all zeros
    assert torch.allclose(dino.preprocess(mean.expand(1, 3, 16, 24).clone(), 8), torch.zeros(1, 3, 16, 24), atol=1e-6)
    with pytest.raises(ValueError):
        dino.preprocess(torch.rand(1, 4, 16, 16), 8)


def test_attention_map_end_to_end_and_local_load(tmp_path):
    model = tiny_vit()
    model.save_pretrained(tmp_path)
    loaded = dino.load_model(str(tmp_path), local_files_only=True)
    assert not loaded.training
    img = torch.rand(1, 3, 102, 138)
    a = dino.attention_map(loaded, img)
    assert torch.allclose(a, dino.attention_map(model, img), atol=1e-6)
    assert a.shape == (1, 13, 17)  # 102x138 -> 104x136 pixels -> 13x17 patches
    # into a YODA mask on an odd latent grid
    m = Y.YodaPlan(start_coverage=0.3, blur=1.0).mask_at(Y.resize_map(a, (13, 17)), 0, 10)
    assert m.shape == (1, 1, 13, 17) and 0 < m.mean() < 1
