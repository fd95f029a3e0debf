"""Colour-space helpers (pure torch): sRGB <-> CIE Lab (D65), luminance-only images, and the final
recombination that keeps the input's lightness exactly and takes only the chroma from the model.

Images are float tensors ``(..., 3, H, W)`` in [0, 1] unless a function says otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

Tensor = torch.Tensor

# sRGB (D65) <-> XYZ, IEC 61966-2-1
_RGB2XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
    dtype=torch.float64,
)
_XYZ2RGB = torch.linalg.inv(_RGB2XYZ)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_EPS = 216 / 24389
_KAPPA = 24389 / 27


def _mix(m: Tensor, x: Tensor) -> Tensor:
    return torch.einsum("ij,...jhw->...ihw", m.to(x.dtype), x)


def srgb_to_linear(x: Tensor) -> Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x.clamp(min=0) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: Tensor) -> Tensor:
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp(min=0) ** (1 / 2.4) - 0.055)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """(..., 3, H, W) sRGB in [0, 1] -> Lab with L in [0, 100]."""
    xyz = _mix(_RGB2XYZ, srgb_to_linear(rgb)) / _WHITE.to(rgb.dtype).view(3, 1, 1)
    f = torch.where(xyz > _EPS, xyz.clamp(min=1e-12) ** (1 / 3), (_KAPPA * xyz + 16) / 116)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_lab`; the result is clipped to [0, 1]."""
    return _lab_to_rgb(lab).clamp(0, 1)


def lab_to_rgb_in_gamut(lab: Tensor, iterations: int = 16) -> Tensor:
    """Like :func:`lab_to_rgb`, but a colour outside sRGB keeps its lightness and hue and loses chroma
    (per pixel, the largest chroma factor in [0, 1] that fits, by bisection) instead of being clipped,
    which would change its lightness."""
    rgb = _lab_to_rgb(lab)
    tol = 1e-9
    bad = ((rgb < -tol) | (rgb > 1 + tol)).any(dim=-3, keepdim=True)
    if not bool(bad.any()):
        return rgb.clamp(0, 1)
    L, ab = lab[..., :1, :, :], lab[..., 1:, :, :]
    lo = torch.zeros_like(L)
    hi = torch.ones_like(L)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        trial = _lab_to_rgb(torch.cat([L, ab * mid], dim=-3))
        ok = ((trial >= -tol) & (trial <= 1 + tol)).all(dim=-3, keepdim=True)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    fixed = _lab_to_rgb(torch.cat([L, ab * lo], dim=-3))
    return torch.where(bad, fixed, rgb).clamp(0, 1)


def _lab_to_rgb(lab: Tensor) -> Tensor:
    L, a, b = lab.unbind(-3)
    fy = (L + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200
    x = torch.where(fx**3 > _EPS, fx**3, (116 * fx - 16) / _KAPPA)
    y = torch.where(L > _KAPPA * _EPS, fy**3, L / _KAPPA)
    z = torch.where(fz**3 > _EPS, fz**3, (116 * fz - 16) / _KAPPA)
    xyz = torch.stack([x, y, z], dim=-3)
    return linear_to_srgb(_mix(_XYZ2RGB, xyz * _WHITE.to(lab.dtype).view(3, 1, 1)))


def luminance_only(rgb: Tensor) -> Tensor:
    """The grayscale image with the same Lab lightness (a = b = 0), as RGB."""
    lab = rgb_to_lab(rgb)
    return lab_to_rgb(torch.cat([lab[..., :1, :, :], torch.zeros_like(lab[..., 1:, :, :])], dim=-3))


def pil_to_tensor(img: Image.Image) -> Tensor:
    a = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def tensor_to_pil(x: Tensor) -> Image.Image:
    a = (x.detach().to(torch.float64).clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(a)


def keep_luminance(source: Image.Image, colored: Image.Image, chroma_strength: float = 1.0) -> Image.Image:
    """``source``'s Lab lightness at its own resolution, with the chroma (a, b) of ``colored`` resized
    to it (bicubic), scaled by ``chroma_strength``."""
    if colored.size != source.size:
        colored = colored.convert("RGB").resize(source.size, Image.Resampling.BICUBIC)
    src, col = rgb_to_lab(pil_to_tensor(source)), rgb_to_lab(pil_to_tensor(colored))
    lab = torch.cat([src[:1], col[1:] * chroma_strength], dim=0)
    return tensor_to_pil(lab_to_rgb_in_gamut(lab))
