"""DINO [CLS] attention maps for YODA (:mod:`lib_attn.methods.yoda`).

YODA's saliency map is the self-supervised DINO attention of the input image: in the last
transformer block, the attention of the [CLS] query to every patch key, per head, averaged over
the heads, on the patch grid, min-max normalized::

    A[b, i, j] = mean_h softmax_n(q_cls^h . k_n^h / sqrt(d))[patch (i, j)]

DINO checkpoints (``facebook/dino-vits8``, ``facebook/dino-vitb8``, ...) load as
``transformers.ViTModel``.  transformers' ``output_attentions=True`` returns nothing under the
default SDPA attention (4.57: a warning and ``attentions=None``), needs ``attn_implementation="eager"``
and then keeps the full N x N probabilities of *every* layer: at 448 px with 8 px patches that is
3136 tokens, 12 x 6 heads x 3136^2 floats = 2.8 GB for ViT-S/8 (5.7 GB for ViT-B/8).  So
:func:`cls_attention` instead hooks the last block's self-attention, takes its (already layer-normed)
input and computes only the [CLS] row from that block's own ``query``/``key`` projections: B x heads x N
numbers, any attention implementation.

transformers is imported inside functions only, so importing this module costs nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lib_attn.methods.yoda.core import normalize_map

Tensor = torch.Tensor

# DINO's (ImageNet's) normalization
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_SIDE = 448


def load_model(name_or_path: str, **kwargs: Any) -> nn.Module:
    """``ViTModel.from_pretrained(name_or_path, add_pooling_layer=False, **kwargs)`` in eval mode.

    ``kwargs`` go to ``from_pretrained`` (``torch_dtype``, ``local_files_only``, ``cache_dir``...).
    """
    from transformers import ViTModel

    kwargs.setdefault("add_pooling_layer", False)
    return ViTModel.from_pretrained(name_or_path, **kwargs).eval()


def patch_size_of(model: nn.Module) -> int:
    """The model's (square) patch size from its config."""
    p = model.config.patch_size
    if isinstance(p, (tuple, list)):
        if p[0] != p[1]:
            raise ValueError(f"non-square patches are not supported: {p}")
        p = p[0]
    return int(p)


def grid_size(height: int, width: int, patch: int, max_side: int = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """Pixel size the model sees: long side at most ``max_side`` (aspect kept, never enlarged), each
    side rounded to the nearest multiple of ``patch`` (at least one patch)."""
    scale = min(1.0, max_side / max(height, width))
    cap = max(1, max_side // patch)
    nh = min(cap, max(1, round(height * scale / patch)))
    nw = min(cap, max(1, round(width * scale / patch)))
    return nh * patch, nw * patch


def preprocess(images: Tensor, patch: int, max_side: int = DEFAULT_MAX_SIDE) -> Tensor:
    """Images (B, 3, H, W) in [0, 1] to DINO pixel values: resized by :func:`grid_size` (bicubic,
    antialiased), clamped to [0, 1], normalized with the ImageNet mean and std."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float()
    size = grid_size(x.shape[-2], x.shape[-1], patch, max_side)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def last_self_attention(model: nn.Module) -> nn.Module:
    """The self-attention module (with ``query``/``key`` Linear layers) of the model's last block."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not layers:
        raise TypeError(f"{type(model).__name__} has no encoder.layer list (expected a transformers ViTModel)")
    attn = layers[-1].attention.attention
    for name in ("query", "key", "num_attention_heads", "attention_head_size"):
        if not hasattr(attn, name):
            raise TypeError(f"last self-attention {type(attn).__name__} has no {name!r}")
    return attn


def cls_row(attn: nn.Module, hidden: Tensor) -> Tensor:
    """[CLS] attention probabilities of one ViT self-attention on its input ``hidden`` (B, N, C):
    (B, heads, N), softmax over all N keys (the [CLS] key included), in float32."""
    b, n, _ = hidden.shape
    heads, d = int(attn.num_attention_heads), int(attn.attention_head_size)
    scale = float(getattr(attn, "scaling", d**-0.5))
    q = attn.query(hidden[:, :1]).view(b, 1, heads, d).transpose(1, 2).float()  # (B, h, 1, d)
    k = attn.key(hidden).view(b, n, heads, d).transpose(1, 2).float()  # (B, h, N, d)
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)[:, :, 0]


@torch.no_grad()
def cls_attention(model: nn.Module, pixel_values: Tensor, normalize: bool = True) -> Tensor:
    """Last-layer [CLS]->patch attention, mean over heads, on the patch grid: (B, H/p, W/p) float32.

    ``pixel_values``: (B, 3, H, W) as from :func:`preprocess`; sides that are not multiples of the
    patch size are resized to the nearest multiple first.  Runs the model once with
    ``interpolate_pos_encoding=True`` (any size); works with eager and SDPA attention alike.
    ``normalize``: min-max normalize per image (:func:`normalize_map`); False gives the raw
    probabilities (they sum with the [CLS] self-weight to 1).
    """
    p = patch_size_of(model)
    h, w = pixel_values.shape[-2:]
    hp, wp = max(1, round(h / p)), max(1, round(w / p))
    if (hp * p, wp * p) != (h, w):
        pixel_values = F.interpolate(pixel_values.float(), size=(hp * p, wp * p), mode="bilinear", align_corners=False)
    param = next(model.parameters())
    pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)

    attn = last_self_attention(model)
    captured: list[Tensor] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(pixel_values=pixel_values, interpolate_pos_encoding=True)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one call of the last self-attention, saw {len(captured)}")
    row = cls_row(attn, captured[0])  # (B, heads, N)
    patches = row[:, :, 1:].mean(dim=1)
    if patches.shape[-1] != hp * wp:
        raise RuntimeError(f"{patches.shape[-1]} patch tokens for a {hp}x{wp} grid")
    grid = patches.reshape(-1, hp, wp)
    return normalize_map(grid) if normalize else grid


def attention_map(model: nn.Module, images: Tensor, max_side: int = DEFAULT_MAX_SIDE) -> Tensor:
    """:func:`preprocess` then :func:`cls_attention`: images (B, 3, H, W) in [0, 1] to a (B, h, w) map."""
    return cls_attention(model, preprocess(images, patch_size_of(model), max_side))
