"""A tiny Flux-like transformer: a diffusion model **without a UNet** (no input/middle/output blocks).

It stands in for Forge's ``IntegratedFluxTransformer2DModel`` so that "unsupported model" paths can be
tested: ``forge_objects.unet.model.diffusion_model`` exists but has ``double_blocks`` / ``single_blocks``
instead of UNet attention layers."""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(1, 2).reshape(b, n, d))


class TinyFluxTransformer(nn.Module):
    def __init__(self, in_channels=4, hidden=32, context_dim=32, vec_dim=16, heads=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.img_in = nn.Linear(in_channels, hidden)
        self.txt_in = nn.Linear(context_dim, hidden)
        self.vector_in = nn.Linear(vec_dim, hidden)
        self.time_in = nn.Linear(1, hidden)
        self.guidance_in = nn.Linear(1, hidden)
        self.double_blocks = nn.ModuleList([_Block(hidden, heads)])
        self.single_blocks = nn.ModuleList([_Block(hidden, heads)])
        self.final_layer = nn.Linear(hidden, in_channels)
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.05)
        self.dtype = torch.float32

    def forward(self, x, timestep, context=None, y=None, guidance=None, transformer_options=None, **kwargs):
        b, c, h, w = x.shape
        img = self.img_in(x.flatten(2).transpose(1, 2))
        cond = self.time_in(timestep.float().view(b, 1) / 1000.0) + self.vector_in(y)
        if guidance is not None:
            cond = cond + self.guidance_in(guidance.float().view(b, 1))
        txt = self.txt_in(context)
        seq = torch.cat([txt, img + cond[:, None]], dim=1)
        for blk in self.double_blocks:
            seq = blk(seq)
        for blk in self.single_blocks:
            seq = blk(seq)
        out = self.final_layer(seq[:, txt.shape[1] :])
        return out.transpose(1, 2).reshape(b, c, h, w)
