"""reForge's ``optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
skip_output_reshape=False)`` (``ldm_patched/ldm/modules/attention.py``, main 3b56b268): the layer's
``attn_precision`` (``extra_options["attn_precision"]`` in a replace patch) says whether to compute in float32."""

from __future__ import annotations

import torch
from backend.attention import attention_pytorch

CALLS: list = []  # the attn_precision of each call (tests read it)


def attention_basic(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False):
    if skip_reshape or skip_output_reshape:
        raise NotImplementedError("skip_reshape is not part of the reForge double")
    CALLS.append(attn_precision)
    if attn_precision == torch.float32 and q.dtype != torch.float32:
        return attention_pytorch(q.float(), k.float(), v.float(), heads, mask).to(q.dtype)
    return attention_pytorch(q, k, v, heads, mask)


optimized_attention = attention_basic
