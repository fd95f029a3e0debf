"""Forge-style forward passes over a real ldm UNet (``backend/nn/unet.py`` behaviour).

``forgeify(unet)`` switches, in place, the class of the UNet and of its ``TimestepEmbedSequential``,
``SpatialTransformer`` and ``BasicTransformerBlock`` instances to subclasses whose ``forward`` takes
``transformer_options`` the way Forge's ``IntegratedUNet2DConditionModel`` does.  Parameters, module
names and the attention modules (``attn1``/``attn2`` with ``to_q``/``to_k``/``to_v``/``to_out``/``heads``)
stay the ldm ones, so the Forge UNet's modules are the tiny model's modules.

What the UNet writes into ``transformer_options`` while it runs (and what attention patches see in
``extra_options``): ``original_shape``, ``transformer_index`` (SpatialTransformers passed so far),
``block`` (``("input", i)`` / ``("middle", 0)`` / ``("output", i)`` / ``("last", 0)``) and ``block_index``
(index inside the SpatialTransformer).  Attention dispatch per transformer block, as Forge:
``attn1_patch`` list on the hidden states before the projections; ``patches_replace["attn1"]`` looked up by
``(block_name, number, block_index)`` first, then ``(block_name, number)``; a replace patch gets
``q, k, v`` already projected ``(B, N, heads*dim_head)`` and its output goes through ``to_out``;
``attn1_output_patch`` after ``to_out``; the same for ``attn2``.
"""

from __future__ import annotations

import sys

import torch
from backend import attention
from torch import nn

_CLASS_CACHE: dict = {}


def _mro_names(obj) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def _apply_control(h, control, name):
    if control is not None and name in control and len(control[name]) > 0:
        ctrl = control[name].pop()
        if ctrl is not None:
            h = h + ctrl
    return h


def _timestep_embedding(unet):
    fn = getattr(sys.modules.get(getattr(unet, "_forge_base_module", ""), None), "timestep_embedding", None)
    if fn is None:
        from ldm.modules.diffusionmodules.util import timestep_embedding as fn
    return fn


def _attention(attn, x, context, value):
    """``attn`` on explicit (context, value): used when an ``attnX_patch`` supplied them."""
    q = attn.to_q(x)
    k = attn.to_k(context)
    v = attn.to_v(value)
    return attn.to_out(attention.attention_function(q, k, v, attn.heads))


class ForgeUNetModel:
    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
        to = {} if transformer_options is None else transformer_options
        to["original_shape"] = list(x.shape)
        to["transformer_index"] = 0
        patches = to.get("patches", {})
        modifiers = to.get("block_modifiers", [])
        assert (y is not None) == (self.num_classes is not None), "y must be given exactly for class-conditional UNets"
        emb = self.time_embed(_timestep_embedding(self)(timesteps, self.model_channels, repeat_only=False))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)

        h = x.type(getattr(self, "dtype", x.dtype))
        hs = []
        for i, module in enumerate(self.input_blocks):
            to["block"] = ("input", i)
            for m in modifiers:
                h = m(h, "before", to)
            h = module(h, emb, context, to)
            h = _apply_control(h, control, "input")
            for m in modifiers:
                h = m(h, "after", to)
            for p in patches.get("input_block_patch", []):
                h = p(h, to)
            hs.append(h)
            for p in patches.get("input_block_patch_after_skip", []):
                h = p(h, to)

        to["block"] = ("middle", 0)
        for m in modifiers:
            h = m(h, "before", to)
        h = self.middle_block(h, emb, context, to)
        h = _apply_control(h, control, "middle")
        for m in modifiers:
            h = m(h, "after", to)

        for i, module in enumerate(self.output_blocks):
            to["block"] = ("output", i)
            skip = _apply_control(hs.pop(), control, "output")
            for p in patches.get("output_block_patch", []):
                h, skip = p(h, skip, to)
            h = torch.cat([h, skip], dim=1)
            output_shape = hs[-1].shape if hs else None
            for m in modifiers:
                h = m(h, "before", to)
            h = module(h, emb, context, to, output_shape)
            for m in modifiers:
                h = m(h, "after", to)

        to["block"] = ("last", 0)
        for m in modifiers:
            h = m(h, "before", to)
        h = h.type(x.dtype)
        if "group_norm_wrapper" in to:
            h = to["group_norm_wrapper"](self.out[0], h, to)
            h = self.out[1:](h)
        else:
            h = self.out(h)
        for m in modifiers:
            h = m(h, "after", to)
        return h


class ForgeTimestepEmbedSequential:
    def forward(self, x, emb, context=None, transformer_options=None, output_shape=None):
        to = {} if transformer_options is None else transformer_options
        inner = to.get("block_inner_modifiers", [])
        for index, layer in enumerate(self):
            for m in inner:
                x = m(x, "before", layer, index, self, to)
            names = _mro_names(layer)
            if "TimestepBlock" in names:
                x = layer(x, emb)
            elif hasattr(layer, "transformer_blocks"):
                x = layer(x, context, transformer_options=to)
                if "transformer_index" in to:
                    to["transformer_index"] += 1
            elif isinstance(layer, ForgeUpsample):
                x = layer(x, output_shape=output_shape)
            else:
                x = layer(x)
            for m in inner:
                x = m(x, "after", layer, index, self, to)
        return x


class ForgeUpsample:
    """Nearest upsampling to the size of the skip connection it will meet (odd latent sizes), then conv."""

    def forward(self, x, output_shape=None):
        if self.dims == 3:
            shape = [x.shape[2], x.shape[3] * 2, x.shape[4] * 2]
            if output_shape is not None:
                shape[1:] = output_shape[3:5]
        else:
            shape = [x.shape[2] * 2, x.shape[3] * 2]
            if output_shape is not None:
                shape = list(output_shape[2:4])
        x = torch.nn.functional.interpolate(x, size=shape, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ForgeSpatialTransformer:
    def forward(self, x, context=None, transformer_options=None):
        to = {} if transformer_options is None else transformer_options
        blocks = self.transformer_blocks
        if not isinstance(context, list):
            context = [context] * len(blocks)
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1).contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(blocks):
            to["block_index"] = i
            x = block(x, context=context[i], transformer_options=to)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class ForgeBasicTransformerBlock:
    @property
    def n_heads(self):
        return self.attn1.heads

    @property
    def d_head(self):
        return self.attn1.to_q.out_features // self.attn1.heads

    def forward(self, x, context=None, transformer_options=None):
        to = {} if transformer_options is None else transformer_options
        block = to.get("block")
        block_index = to.get("block_index", 0)
        patches = to.get("patches", {})
        replace = to.get("patches_replace", {})
        extra_options = {k: v for k, v in to.items() if k not in ("patches", "patches_replace")}
        extra_options["n_heads"] = self.n_heads
        extra_options["dim_head"] = self.d_head
        full_key = (block[0], block[1], block_index) if block is not None else None

        # self-attention
        n = self.norm1(x)
        context1 = context if self.disable_self_attn else None
        value1 = None
        if "attn1_patch" in patches:
            if context1 is None:
                context1 = n
            value1 = context1
            for p in patches["attn1_patch"]:
                n, context1, value1 = p(n, context1, value1, extra_options)
        table = replace.get("attn1", {})
        key = full_key if full_key in table else block
        if key in table:
            if context1 is None:
                context1 = n
                value1 = n
            q = self.attn1.to_q(n)
            k = self.attn1.to_k(context1)
            v = self.attn1.to_v(value1)
            n = self.attn1.to_out(table[key](q, k, v, extra_options))
        elif value1 is not None:
            n = _attention(self.attn1, n, context1, value1)
        else:
            n = self.attn1(n, context=context1)
        for p in patches.get("attn1_output_patch", []):
            n = p(n, extra_options)
        x += n  # in place, as Forge does (autograd through this block needs the saved tensors kept as they were)
        for p in patches.get("middle_patch", []):
            x = p(x, extra_options)

        # cross-attention
        n = self.norm2(x)
        context2 = context
        value2 = None
        if "attn2_patch" in patches:
            value2 = context2
            for p in patches["attn2_patch"]:
                n, context2, value2 = p(n, context2, value2, extra_options)
        table = replace.get("attn2", {})
        key = full_key if full_key in table else block
        if key in table:
            if value2 is None:
                value2 = context2
            q = self.attn2.to_q(n)
            k = self.attn2.to_k(context2)
            v = self.attn2.to_v(value2)
            n = self.attn2.to_out(table[key](q, k, v, extra_options))
        elif value2 is not None:
            n = _attention(self.attn2, n, context2, value2)
        else:
            n = self.attn2(n, context=context2)
        for p in patches.get("attn2_output_patch", []):
            n = p(n, extra_options)
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


def _swap(module: nn.Module, mixin: type) -> None:
    cls = type(module)
    if issubclass(cls, mixin):
        return
    new = _CLASS_CACHE.get((cls, mixin))
    if new is None:
        new = type(f"Forge{cls.__name__}", (mixin, cls), {"__module__": __name__, "_forge_base_module": cls.__module__})
        _CLASS_CACHE[(cls, mixin)] = new
    module.__class__ = new


def forgeify(unet: nn.Module) -> nn.Module:
    """Make ``unet`` (an ldm-style UNetModel) behave like Forge's UNet; returns the same object."""
    for name in ("input_blocks", "middle_block", "output_blocks", "time_embed", "out"):
        if not hasattr(unet, name):
            raise TypeError(f"not an ldm-style UNet: missing {name}")
    _swap(unet, ForgeUNetModel)
    for m in unet.modules():
        names = _mro_names(m)
        if "TimestepEmbedSequential" in names:
            _swap(m, ForgeTimestepEmbedSequential)
        elif "Upsample" in names and hasattr(m, "use_conv") and hasattr(m, "dims"):
            _swap(m, ForgeUpsample)
        elif hasattr(m, "transformer_blocks") and hasattr(m, "proj_in"):
            _swap(m, ForgeSpatialTransformer)
        elif all(hasattr(m, a) for a in ("attn1", "attn2", "norm1", "norm2", "norm3", "ff")):
            _swap(m, ForgeBasicTransformerBlock)
    return unet
