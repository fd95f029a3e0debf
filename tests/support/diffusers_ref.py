"""Independent PAG and SAG: diffusers' own UNet, PAG attention processors and SAG pipeline steps on the same
(converted) weights.

``to_diffusers_unet`` converts a tiny ldm UNet with diffusers' single-file conversion helpers (no hand-written key
mapping); ``diffusers_pag_eps`` runs the batch ``[uncond, cond, cond]`` with diffusers' ``PAGMixin`` processors on
the layers diffusers' own matcher selects, and combines with ``PAGMixin._apply_perturbed_attention_guidance``.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from diffusers.pipelines.pag.pag_utils import PAGMixin

from tests.support.tiny import UNET_CONFIGS


def to_diffusers_unet(ldm_unet: torch.nn.Module, kind: str = "sd1") -> UNet2DConditionModel:
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in UNET_CONFIGS[kind].items()}
    original_config = {"model": {"params": {
        "unet_config": {"params": params},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
    }}}
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ldm_unet.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(original_config, checkpoint)
    unet = UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    missing, unexpected = unet.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return unet.eval().requires_grad_(False).to(next(ldm_unet.parameters()).dtype)


class _PagRunner(PAGMixin):
    def __init__(self, unet):
        self.unet = unet


def diffusers_pag_eps(dunet, x, t, cond_ctx, uncond_ctx, cfg: float, pag_scale: float, layers="mid"):
    """Guided eps the diffusers way; processors are restored afterwards, also on error."""
    runner = _PagRunner(dunet)
    runner.set_pag_applied_layers(layers)
    runner._pag_scale = pag_scale
    runner._pag_adaptive_scale = 0.0
    saved = dunet.attn_processors
    runner._set_pag_attn_processor(runner.pag_applied_layers, do_classifier_free_guidance=True)
    try:
        batch = torch.cat([x, x, x])
        ctx = torch.cat([uncond_ctx, cond_ctx, cond_ctx])
        eps = dunet(batch, torch.cat([t, t, t]), encoder_hidden_states=ctx).sample
        return runner._apply_perturbed_attention_guidance(eps, True, cfg, t)
    finally:
        dunet.set_attn_processor(saved)


class _AtSigma:
    """``alphas_cumprod`` for diffusers' SAG helpers at a k-diffusion sigma: ``1 / (1 + sigma^2)`` at any timestep
    index (the samplers' timesteps need not be whole numbers)."""

    def __init__(self, sigma):
        self.a = 1.0 / (1.0 + sigma**2)

    def to(self, *args, **kwargs):
        return self

    def __getitem__(self, t):
        return self.a


class _SagRunner:
    """What diffusers' ``StableDiffusionSAGPipeline`` helpers read of ``self``: the UNet and a scheduler."""

    def __init__(self, unet, sigma):
        from diffusers import DDIMScheduler

        self.unet = unet
        self.scheduler = DDIMScheduler()
        self.scheduler.alphas_cumprod = _AtSigma(sigma)


def diffusers_sag_eps(dunet, x, t, sigma, cond_ctx, uncond_ctx, cfg: float, sag_scale: float):
    """Guided eps as one step of diffusers' SAG pipeline: its store processor on the middle block's first
    self-attention, its ``pred_x0``/``pred_epsilon``/``sag_masking`` and its guidance line, on ``x`` in diffusers'
    latent scaling.  ``cfg`` of 1 or less takes the pipeline's no-CFG branch."""
    from diffusers.pipelines.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        CrossAttnStoreProcessor,
        StableDiffusionSAGPipeline,
    )

    runner = _SagRunner(dunet, sigma)
    store = CrossAttnStoreProcessor()
    attn1 = dunet.mid_block.attentions[0].transformer_blocks[0].attn1
    saved = attn1.processor
    attn1.processor = store
    map_size = None

    def get_map_size(module, inputs, output):
        nonlocal map_size
        map_size = output[0].shape[-2:]

    handle = dunet.mid_block.attentions[0].register_forward_hook(get_map_size)
    try:
        pipe = StableDiffusionSAGPipeline
        if cfg > 1:
            eps = dunet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond_ctx, cond_ctx]))
            eps_u, eps_c = eps.sample.chunk(2)
            guided = eps_u + cfg * (eps_c - eps_u)
            x0 = pipe.pred_x0(runner, x, eps_u, t)
            uncond_attn, _ = store.attention_probs.chunk(2)
            degraded = pipe.sag_masking(runner, x0, uncond_attn, map_size, t, pipe.pred_epsilon(runner, x, eps_u, t))
            degraded_pred = dunet(degraded, t, encoder_hidden_states=uncond_ctx).sample
            return guided + sag_scale * (eps_u - degraded_pred)
        guided = dunet(x, t, encoder_hidden_states=cond_ctx).sample
        x0 = pipe.pred_x0(runner, x, guided, t)
        eps = pipe.pred_epsilon(runner, x, guided, t)
        degraded = pipe.sag_masking(runner, x0, store.attention_probs, map_size, t, eps)
        degraded_pred = dunet(degraded, t, encoder_hidden_states=cond_ctx).sample
        return guided + sag_scale * (guided - degraded_pred)
    finally:
        handle.remove()
        attn1.processor = saved
