"""An independent PAG: diffusers' own UNet and PAG attention processors on the same (converted) weights.

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
