"""SEG's query blur against the official SEG-SDXL formulas, rewritten here from a reading of ``pipeline_seg.py``
(SusungHong/SEG-SDXL): the kernel size ``ceil(6 sigma) + 1`` made odd and capped at the grid's width, a 2-D kernel
as the outer product of a ``linspace`` Gaussian, reflected edges, one grouped convolution; a sigma above 9999 sets
every query to its spatial mean."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lib_attn.methods.seg.core import INFINITE, blur_queries, kernel_size, seg_attention


def official_blur(img, sigma):
    """The official code's path, for a square grid: (B, C, H, W) maps."""
    k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    width = img.shape[-1]
    k = min(k, width - (width % 2 - 1))
    half = (k - 1) * 0.5
    x = torch.linspace(-half, half, steps=k)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    k1 = (pdf / pdf.sum()).to(img.dtype)
    k2 = torch.mm(k1[:, None], k1[None, :]).expand(img.shape[-3], 1, k, k)
    img = F.pad(img, [k // 2] * 4, mode="reflect")
    return F.conv2d(img, k2, groups=img.shape[-3])


def official_query(q, heads, sigma):
    """(B, N, heads*d) -> the official reshapes: (B, heads, N, d) -> (B, heads*d, H, W) -> blur -> back."""
    b, n, c = q.shape
    d = c // heads
    side = math.isqrt(n)
    q4 = q.view(b, n, heads, d).transpose(1, 2)
    maps = q4.permute(0, 1, 3, 2).reshape(b, heads * d, side, side)
    maps = maps.mean(dim=(-2, -1), keepdim=True).expand_as(maps) if sigma > INFINITE else official_blur(maps, sigma)
    q4 = maps.reshape(b, heads, d, n).permute(0, 1, 3, 2)
    return q4.transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("side", [2, 3, 4, 8, 9, 16])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5, 4.0, 100.0, 9999.5, 1e7])
def test_blur_matches_the_official_code_on_square_grids(side, sigma):
    g = torch.Generator().manual_seed(side)
    q = torch.randn(2, side * side, 12, generator=g, dtype=torch.float64)
    ours = blur_queries(q, (side, side), sigma)
    ref = official_query(q, 3, sigma)
    # both kernels are made in float32; the official linspace positions differ from whole numbers in the last bits
    assert (ours - ref).abs().max() < 1e-6
    if side > 1:
        assert (ours - q).abs().max() > 1e-3


def test_kernel_size_follows_the_official_rule_and_fits_non_square_grids():
    assert kernel_size(1.0, 64, 64) == 7  # ceil(6) + 1
    assert kernel_size(0.5, 64, 64) == 3  # ceil(3) + 1 = 4, made odd
    assert kernel_size(2.6, 64, 64) == 17  # ceil(15.6) + 1 = 17
    assert kernel_size(100.0, 8, 8) == 9  # capped: even side s -> s + 1
    assert kernel_size(100.0, 9, 9) == 9  # odd side s -> s
    assert kernel_size(100.0, 4, 12) == 5  # the shorter side caps a non-square grid
    q = torch.randn(1, 4 * 12, 6)
    assert blur_queries(q, (4, 12), 100.0).shape == q.shape  # reflected padding fits


def test_infinite_blur_gives_uniform_attention():
    """Every query the same: the attention map is uniform, each token gets the mean of V."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 8, generator=g) for _ in range(3))
    out = seg_attention(q, k, v, 2, (3, 4), INFINITE * 2)
    qm = q.mean(1, keepdim=True)
    ref = []
    for h in range(2):  # per head, explicitly
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax(qm[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, dim=-1)
        ref.append((w @ v[..., sl]).expand(-1, 12, -1))
    assert torch.allclose(out, torch.cat(ref, -1), atol=1e-6)


def test_sigma_zero_leaves_the_queries():
    q = torch.randn(1, 16, 4)
    assert torch.equal(blur_queries(q, (4, 4), 0.0), q)
