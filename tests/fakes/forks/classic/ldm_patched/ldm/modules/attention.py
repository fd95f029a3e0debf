"""Forge Classic's ``optimized_attention(q, k, v, heads, mask=None)`` (``ldm_patched/ldm/modules/attention.py``,
classic 1f95d717); it takes no ``attn_precision``."""

from __future__ import annotations

from backend.attention import attention_pytorch


def attention_basic(q, k, v, heads, mask=None):
    return attention_pytorch(q, k, v, heads, mask)


optimized_attention = attention_basic
