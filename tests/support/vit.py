"""A random-init transformers ViTModel standing in for DINO (no weights are downloaded)."""

from __future__ import annotations


def tiny_vit(**overrides):
    from transformers import ViTConfig, ViTModel

    cfg = dict(
        image_size=64,
        patch_size=8,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        initializer_range=0.2,  # larger than the default 0.02 so the attention is far from uniform
    )
    cfg.update(overrides)
    return ViTModel(ViTConfig(**cfg), add_pooling_layer=False).eval()
