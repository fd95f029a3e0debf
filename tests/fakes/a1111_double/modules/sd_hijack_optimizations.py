"""Double of A1111's attention optimization: like ``sd_hijack_optimizations`` with the "sdp" choice (or
"sdp-no-mem" under ``--opt-sdp-no-mem-attention``: the same call inside ``sdp_kernel`` with the memory-efficient
kernel off), it assigns a ``scaled_dot_product_attention`` forward to the ldm ``CrossAttention`` CLASS (A1111 does
this at every model load), and ``undo()`` puts the original back."""

import torch
import torch.nn.functional as F
from ldm.modules import attention as ldm_attention
from modules import shared

_original = None


def sdp_attention_forward(self, x, context=None, mask=None, **kwargs):
    h = self.heads
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, n, _ = q.shape
    q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(b, n, -1)
    return self.to_out(out)


def sdp_no_mem_attention_forward(self, x, context=None, mask=None, **kwargs):
    with torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=True, enable_mem_efficient=False):
        return sdp_attention_forward(self, x, context, mask)


def apply():
    global _original
    if _original is None:
        _original = ldm_attention.CrossAttention.forward
    no_mem = shared.cmd_opts.opt_sdp_no_mem_attention
    ldm_attention.CrossAttention.forward = sdp_no_mem_attention_forward if no_mem else sdp_attention_forward


def undo():
    global _original
    if _original is not None:
        ldm_attention.CrossAttention.forward = _original
        _original = None
