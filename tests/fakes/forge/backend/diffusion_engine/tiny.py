"""Diffusion engines of the double (what ``backend.loader.forge_loader`` would return).

``TinyUNetEngine`` wraps a ``TinySD`` from ``tests.support.tiny`` (SD1 / SD2 / SDXL): its ldm UNet is made
Forge-style in place (``backend.nn.unet.forgeify``) and put in a ``UnetPatcher`` whose ``KModel`` converts
sigmas with the model's own ``alphas_cumprod``.  ``TinyFluxEngine`` has no UNet (Flux stand-in).
Latents are encoded / decoded with the TinySD's own ``encode_first_stage`` / ``decode_first_stage`` (the
same stand-in VAE the A1111 double uses); without them a private stand-in of the same shape is used.
"""

from __future__ import annotations

import hashlib

import torch
from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
from backend.modules.k_prediction import Prediction, PredictionFlow
from backend.nn.flux import TinyFluxTransformer
from backend.nn.unet import forgeify
from backend.patcher.base import ModelPatcher
from backend.patcher.unet import UnetPatcher
from torch import nn


class StandInFirstStage(nn.Module):
    """Latent <-> image stand-in for a VAE: 8x8 average pooling + 1x1 projection, and back."""

    def __init__(self, latent_channels=4, seed=1234):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.encoder = nn.Conv2d(3, latent_channels, 1)
        self.decoder = nn.Conv2d(latent_channels, 3, 1)
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)

    def encode(self, image):  # image in [-1, 1], (B, 3, H, W)
        return self.encoder(torch.nn.functional.avg_pool2d(image, 8))

    def decode(self, latent):
        return torch.tanh(torch.nn.functional.interpolate(self.decoder(latent), scale_factor=8, mode="nearest"))


class VAE:
    def __init__(self, first_stage_model, latent_channels=4):
        self.first_stage_model = first_stage_model
        self.latent_channels = latent_channels
        self.patcher = ModelPatcher(first_stage_model)


class CLIP:
    def __init__(self, encoder):
        self.cond_stage_model = encoder
        self.patcher = ModelPatcher(encoder) if isinstance(encoder, nn.Module) else None


def _hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:10]


class TinyUNetEngine(ForgeDiffusionEngine):
    def __init__(self, tiny, checkpoint_info=None):
        super().__init__()
        self.tiny = tiny
        unet_module = forgeify(tiny.model.diffusion_model)
        prediction_type = "v_prediction" if getattr(tiny, "parameterization", "eps") == "v" else "epsilon"
        predictor = Prediction(tiny.alphas_cumprod, prediction_type=prediction_type)
        unet = UnetPatcher.from_model(unet_module, k_predictor=predictor)
        self.has_own_first_stage = hasattr(tiny, "decode_first_stage") and hasattr(tiny, "encode_first_stage")
        first_stage = getattr(tiny, "first_stage_model", tiny) if self.has_own_first_stage else StandInFirstStage()
        vae = VAE(first_stage, latent_channels=getattr(tiny, "latent_channels", 4))
        clip = CLIP(getattr(tiny, "cond_stage_model", None))
        self.forge_objects = ForgeObjects(unet=unet, clip=clip, vae=vae, clipvision=None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.is_sd1 = bool(getattr(tiny, "is_sd1", False))
        self.is_sd2 = bool(getattr(tiny, "is_sd2", False))
        self.is_sdxl = bool(getattr(tiny, "is_sdxl", False))
        # Forge 2's engines keep their ClassicTextProcessingEngine(s): sd15/sd20 ``text_processing_engine``,
        # sdxl ``text_processing_engine_l`` and ``_g``; each has ``tokenize(texts) -> id lists (no BOS/EOS)``
        tokenizer = getattr(tiny, "cond_stage_model", None)
        if tokenizer is not None and hasattr(tokenizer, "tokenize"):
            if self.is_sdxl:
                self.text_processing_engine_l = self.text_processing_engine_g = tokenizer
            else:
                self.text_processing_engine = tokenizer
        self.extra_generation_params = {}
        self.comments = []
        self.sd_checkpoint_info = checkpoint_info
        self.sd_model_hash = _hash(getattr(checkpoint_info, "title", "tiny"))

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        return self.tiny.get_learned_conditioning(list(prompt))

    @torch.inference_mode()
    def encode_first_stage(self, x):
        if self.has_own_first_stage:
            return self.tiny.encode_first_stage(x)
        return self.forge_objects.vae.first_stage_model.encode(x)

    @torch.inference_mode()
    def decode_first_stage(self, x):
        if self.has_own_first_stage:
            return self.tiny.decode_first_stage(x)
        return self.forge_objects.vae.first_stage_model.decode(x)


class _HashTextEncoder(nn.Module):
    """Deterministic prompt -> (tokens, dim) embedding for the Flux stand-in."""

    def __init__(self, dim=32, tokens=8, vec_dim=16):
        super().__init__()
        self.dim, self.tokens, self.vec_dim = dim, tokens, vec_dim

    def forward(self, prompts):
        rows, vecs = [], []
        for text in prompts:
            g = torch.Generator().manual_seed(int(_hash(text), 16) % (2**31))
            rows.append(torch.randn(self.tokens, self.dim, generator=g))
            vecs.append(torch.randn(self.vec_dim, generator=g))
        return torch.stack(rows), torch.stack(vecs)


class _StandInFlowPrediction(PredictionFlow):
    """Flow schedule whose smallest discrete sigma is 1/1000 (not 0), so the default uniform schedule
    of the double never asks the sampler to step from sigma 0."""

    def __init__(self, shift=1.0, multiplier=1000, timesteps=1000):
        super().__init__(shift=shift, multiplier=multiplier, timesteps=timesteps)
        self.register_buffer("sigmas", self.sigma(torch.arange(0, timesteps).float()))

    def timestep(self, sigma):
        return sigma * self.multiplier - 1

    def sigma(self, timestep):
        return super().sigma(timestep + 1)


class TinyFluxEngine(ForgeDiffusionEngine):
    def __init__(self, checkpoint_info=None, seed=0):
        super().__init__()
        model = TinyFluxTransformer(seed=seed)
        unet = UnetPatcher.from_model(model, k_predictor=_StandInFlowPrediction(shift=1.0))
        self.text_encoder = _HashTextEncoder()
        self.forge_objects = ForgeObjects(
            unet=unet, clip=CLIP(self.text_encoder), vae=VAE(StandInFirstStage()), clipvision=None
        )
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.use_distilled_cfg_scale = True
        self.extra_generation_params = {}
        self.comments = []
        self.sd_checkpoint_info = checkpoint_info
        self.sd_model_hash = _hash(getattr(checkpoint_info, "title", "flux"))

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        crossattn, vector = self.text_encoder(list(prompt))
        guidance = torch.full((len(prompt), 1), float(getattr(prompt, "distilled_cfg_scale", None) or 3.5))
        return {"crossattn": crossattn, "vector": vector, "guidance": guidance}

    @torch.inference_mode()
    def encode_first_stage(self, x):
        return self.forge_objects.vae.first_stage_model.encode(x)

    @torch.inference_mode()
    def decode_first_stage(self, x):
        return self.forge_objects.vae.first_stage_model.decode(x)
