"""Forge's ``attention_function(q, k, v, heads, mask=None)`` on projected ``(B, N, heads*dim_head)`` tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_pytorch(q, k, v, heads, mask=None, skip_reshape=False):
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


attention_function = attention_pytorch


def attention_xformers(*args, **kwargs):  # pragma: no cover - never selected in the double
    raise NotImplementedError


def get_attn_precision():
    return torch.float32
