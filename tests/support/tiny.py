"""Tiny random-weight Stable Diffusion stand-ins built from the REAL ``ldm`` package.

The UNet is ``ldm.modules.diffusionmodules.openaimodel.UNetModel`` (PyPI ``stable-diffusion-sdkit``) in small
configs whose block layout and module names match the real models (host-contract.md section 4):

* ``sd1``: channel_mult (1, 2, 4, 4), attention at levels 0-2, 1 transformer block each: input 1, 2, 4, 5, 7, 8,
  middle, output 3-11; SD1.5's 16 self-attention layers.
* ``sd2``: the same layout with ``use_linear_in_transformer`` and head-dim based heads (v-prediction).
* ``sdxl``: channel_mult (1, 2, 4), attention at levels 1-2 only, 2 transformer blocks per SpatialTransformer,
  a pooled ``vector`` (``y``) through ``num_classes="sequential"``; dict conds ``{'crossattn', 'vector'}``.
* ``sd15``: the full-size SD1.5 UNet (860M parameters) for benchmarks only.
* ``sdxl_full``: the full-size SDXL UNet (2.6B parameters: 2 transformer blocks at the middle level, 10 at the
  lowest and in the middle block, 2048-wide context, the 2816-wide pooled vector) for benchmarks only.

ldm zero-initializes every output projection (``zero_module``), which would make attention layers have no
effect; those parameters are re-drawn at random so that attention edits change the output.

:class:`TinySD` mimics what the WebUI sampling stack uses of ``shared.sd_model``.  Its text encoder and VAE
are deterministic stand-ins (hash-seeded word embeddings; an 8x average-pool + 1x1 conv), not real models.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from ldm.modules import attention as ldm_attention
from ldm.modules.diffusionmodules import openaimodel
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from torch import nn

_COMMON = dict(in_channels=4, out_channels=4, num_res_blocks=2, use_spatial_transformer=True, legacy=False,
               use_checkpoint=False, image_size=32)

UNET_CONFIGS: dict[str, dict] = {
    "sd1": dict(_COMMON, model_channels=32, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1),
                num_heads=2, transformer_depth=1, context_dim=32),
    "sd2": dict(_COMMON, model_channels=32, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1),
                num_head_channels=16, transformer_depth=1, context_dim=48, use_linear_in_transformer=True),
    "sdxl": dict(_COMMON, model_channels=32, channel_mult=(1, 2, 4), attention_resolutions=(4, 2),
                 num_head_channels=16, transformer_depth=2, context_dim=[64, 64], use_linear_in_transformer=True,
                 num_classes="sequential", adm_in_channels=24),
    "sd15": dict(_COMMON, model_channels=320, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1),
                 num_heads=8, transformer_depth=1, context_dim=768, image_size=64),
    "sdxl_full": dict(_COMMON, model_channels=320, channel_mult=(1, 2, 4), attention_resolutions=(4, 2),
                      num_head_channels=64, transformer_depth=10, context_dim=[2048] * 10,
                      use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=2816, image_size=128),
}
_BASE_KIND = {"sd15": "sd1", "sdxl_full": "sdxl"}
# sdkit's ldm puts the same number of transformer blocks at every level; SDXL has 2 at its middle level
# (input blocks 4, 5 and output blocks 3-5) and 10 at the lowest and in the middle block
_LEVEL_DEPTHS = {"sdxl_full": ((("input_blocks", (4, 5)), ("output_blocks", (3, 4, 5))), 2)}


class _TorchWithCatFix:
    """What A1111's ``sd_hijack_unet`` does to ldm's ``th``: a skip connection whose size differs from the
    upsampled tensor (latents that are not multiples of 8) is met by resizing the upsampled tensor."""

    def __init__(self, torch_module):
        self._torch = torch_module

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def cat(self, tensors, *args, **kwargs):
        if len(tensors) == 2:
            a, b = tensors
            if a.shape[-2:] != b.shape[-2:]:
                a = F.interpolate(a, b.shape[-2:], mode="nearest")
            tensors = (a, b)
        return self._torch.cat(tensors, *args, **kwargs)


class _CastInput(nn.Sequential):
    """ldm computes the timestep embedding in float32; cast it to the weights' dtype (lets tests run in float64)."""

    def forward(self, x):
        return super().forward(x.to(self[0].weight.dtype))


def install_size_fix() -> None:
    if not isinstance(openaimodel.th, _TorchWithCatFix):
        openaimodel.th = _TorchWithCatFix(torch)
    # ldm's attention upcasts q/k to float32 when _ATTN_PRECISION == "fp32"; with float32 inputs the other branch
    # computes the same thing, and it also runs in float64 (used by the exactness tests).
    ldm_attention._ATTN_PRECISION = "native"


def make_unet(kind: str = "sd1", seed: int = 0, in_channels: int = 4, *, meta: bool = False) -> UNetModel:
    """The ldm UNet of ``kind`` with random weights; ``meta``: on the ``meta`` device (shapes only, nothing
    allocated, for counting)."""
    install_size_fix()
    cfg = dict(UNET_CONFIGS[kind], in_channels=in_channels)
    adm = cfg.pop("adm_in_channels", None)
    if cfg.get("num_classes") == "sequential":
        cfg["num_classes"] = "continuous"  # sdkit's ldm has no "sequential"; its label_emb is replaced below
    with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else "cpu"):
        torch.manual_seed(seed)
        unet = UNetModel(**cfg)
        if adm:
            ted = unet.model_channels * 4  # sgm's "sequential" pooled-vector embedding
            unet.label_emb = nn.Sequential(nn.Linear(adm, ted), nn.SiLU(), nn.Linear(ted, ted))
        if kind in _LEVEL_DEPTHS:
            where, depth = _LEVEL_DEPTHS[kind]
            for blocks, numbers in where:
                for n in numbers:
                    st = getattr(unet, blocks)[n][1]
                    st.transformer_blocks = st.transformer_blocks[:depth]
        if not meta:
            with torch.no_grad():
                for p in unet.parameters():
                    if p.numel() and not p.any():
                        p.normal_(0.0, 0.05)
    for m in unet.modules():  # ldm's GroupNorm32 upcasts to float32; plain GroupNorm is the same in float32
        if type(m).__name__ == "GroupNorm32":
            m.__class__ = nn.GroupNorm
    unet.time_embed.__class__ = _CastInput
    if isinstance(getattr(unet, "label_emb", None), nn.Sequential):
        unet.label_emb.__class__ = _CastInput
    return unet.eval().requires_grad_(False)


def _word_vector(word: str, dim: int, salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(word.encode()) + salt)
    return torch.randn(dim, generator=g) * 0.5


class _Tokenizer:
    def __init__(self, split):
        self._split = split

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [[zlib.crc32(w.encode()) % 49406 for w in self._split(t)] for t in texts]


class DiffusionWrapper(nn.Module):
    """``sd_model.model`` (ldm's DiffusionWrapper): ``apply_model`` calls it, so the forward pre-hook that A1111's
    ``--medvram`` puts on it runs before every UNet call."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, **kwargs):
        return self.diffusion_model(x, t, **kwargs)


class TinySD(nn.Module):
    """Stand-in for ``shared.sd_model`` (LatentDiffusion / SDXL DiffusionEngine) around a real ldm UNet."""

    def __init__(self, kind: str = "sd1", seed: int = 0, inpainting: bool = False):
        super().__init__()
        base = _BASE_KIND.get(kind, kind)
        self.kind = kind
        self.model = DiffusionWrapper(make_unet(kind, seed, in_channels=9 if inpainting else 4))
        self.model.conditioning_key = "hybrid" if inpainting else "crossattn"
        self.is_sd1, self.is_sd2, self.is_sdxl = base == "sd1", base == "sd2", base == "sdxl"
        self.is_sd3 = False
        self.parameterization = "v" if base == "sd2" else "eps"
        self.cond_stage_key = "txt"
        self.latent_channels = 4
        self.inpainting = inpainting
        ctx = UNET_CONFIGS[kind]["context_dim"]
        self.context_dim = ctx[0] if isinstance(ctx, list) else ctx  # sdkit's ldm wants a list per depth
        self.adm_dim = UNET_CONFIGS[kind].get("adm_in_channels", 0)
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, 0).float())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.vae_enc = nn.Conv2d(3, 4, 1)
            self.vae_dec = nn.Conv2d(4, 3, 1)
        self.requires_grad_(False)
        # what A1111 gives SD1/SD2 (and SDXL, through GeneralConditioner) as ``sd_model.cond_stage_model``: only
        # ``tokenize(texts) -> token id lists without BOS/EOS`` is used
        self.cond_stage_model = _Tokenizer(self.words)

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.diffusion_model.parameters()).dtype

    # ---- text encoder stand-in ---------------------------------------------------------------
    @staticmethod
    def words(prompt: str) -> list[str]:
        """The stand-in tokenizer: one token per whitespace-separated word, commas apart."""
        return prompt.lower().replace(",", " , ").split()

    def _encode_one(self, prompt: str) -> torch.Tensor:
        words = self.words(prompt)
        chunks = [words[i : i + 75] for i in range(0, max(len(words), 1), 75)] or [[]]
        rows = []
        for chunk in chunks:  # 75 tokens + BOS + EOS per chunk, like the WebUI's CLIP chunking
            toks = ["<bos>", *chunk, "<eos>"] + ["<pad>"] * (75 - len(chunk))
            rows.extend(_word_vector(w, self.context_dim) for w in toks)
        return torch.stack(rows)

    def get_learned_conditioning(self, prompts):
        embs = [self._encode_one(p) for p in prompts]
        n = max(e.shape[0] for e in embs)
        embs = [torch.cat([e, e[-1:].expand(n - e.shape[0], -1)]) if e.shape[0] < n else e for e in embs]
        c = torch.stack(embs).to(self.device, self.dtype)
        if self.is_sdxl:
            pooled = torch.stack([_word_vector(p, self.adm_dim, salt=7) for p in prompts]).to(self.device, self.dtype)
            return {"crossattn": c, "vector": pooled}
        return c

    # ---- UNet call as the WebUI makes it --------------------------------------------------------
    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict, **kwargs) -> torch.Tensor:
        unet = self.model.diffusion_model
        unet.dtype = self.dtype  # ldm casts the input to unet.dtype (float32 unless use_fp16)
        if self.is_sdxl:
            # sdkit's SpatialTransformer indexes the context per transformer block when depth > 1
            ctx, y = [cond["crossattn"]] * UNET_CONFIGS[self.kind]["transformer_depth"], cond["vector"]
        else:
            ctx, y = cond["c_crossattn"][0], None
        concat = cond.get("c_concat")
        if unet.in_channels > x.shape[1] and concat:
            x = torch.cat([x, concat[0].to(x.dtype)], dim=1)
        return self.model(x, t, context=ctx, y=y)

    # ---- VAE stand-in ---------------------------------------------------------------------------
    def encode_first_stage(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8)."""
        return self.vae_enc(F.avg_pool2d(images.to(self.dtype), 8))

    def get_first_stage_encoding(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1]."""
        return torch.tanh(F.interpolate(self.vae_dec(z.to(self.dtype)), scale_factor=8, mode="nearest"))


def make_sd_model(kind: str = "sd1", seed: int = 0, inpainting: bool = False) -> TinySD:
    return TinySD(kind, seed, inpainting).eval()
