"""Self-Attention Guidance (Hong, Lee, Jang, Kim, ICCV 2023), as diffusers' ``StableDiffusionSAGPipeline`` does it.

At each step, from the self-attention map of the first transformer block of the middle block (on the uncond rows
where CFG runs, else on the cond rows): the tokens that the queries attend to most (attention received, summed over
the queries and averaged over the heads, above a threshold) form a mask, resized to the latent by nearest neighbour.
Inside the mask the predicted x0 is blurred (Gaussian, 9x9 kernel, reflected edges), then noised again with the step's
predicted noise; one more model call on that degraded latent (same conditioning) gives the degraded prediction.  The
guidance adds ``s * (eps - eps_degraded)`` (in x0 terms ``s * (x0_degraded_input - x0_degraded)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lib_attn.layers import LayerKey
from lib_attn.ops import active_at, blend, gaussian_blur, heads

Tensor = torch.Tensor

KERNEL = 9  # diffusers' and ComfyUI's blur kernel size


@torch.no_grad()
def attention_mass(q: Tensor, k: Tensor, n_heads: int) -> Tensor:
    """Attention each key receives: ``softmax(Q K^T / sqrt(d))`` summed over the queries and averaged over the heads;
    ``q``, ``k``: projected ``(B, N, heads*d)``; returns (B, N).  An observation, never differentiated: it saves
    nothing for autograd even inside a pass with grad (style reference's), whose checkpointed blocks must save the
    same tensors when they are recomputed in backward, where the observer no longer looks."""
    d = q.shape[-1] // n_heads
    probs = torch.softmax(heads(q, n_heads) @ heads(k, n_heads).transpose(-1, -2) * d**-0.5, dim=-1)
    return probs.mean(dim=1).sum(dim=1)


def sag_mask(mass: Tensor, grid: tuple[int, int], latent_hw: tuple[int, int], threshold: float) -> Tensor:
    """(B, 1, H, W) mask of the latent: 1 where the token over it receives more than ``threshold``."""
    m = (mass > threshold).to(mass.dtype).reshape(mass.shape[0], 1, *grid)
    return F.interpolate(m, size=latent_hw)


def degrade(x0: Tensor, mask: Tensor, sigma: float) -> Tensor:
    """``x0`` blurred inside ``mask``, kept outside it.  The kernel is 9 wide (smaller on latents too small for it)."""
    size = min(KERNEL, 2 * min(x0.shape[-2:]) - 1)  # reflected padding needs a pad below the side
    blurred = gaussian_blur(x0, sigma, size=size, mode="reflect")
    return blend(blurred, x0, mask)


@dataclass(frozen=True)
class SagPlan:
    """SAG for one sampling pass."""

    scale: float
    blur_sigma: float
    threshold: float
    start: float
    end: float
    layer: LayerKey  # the middle block's first self-attention

    @classmethod
    def build(cls, settings: Any, available: Sequence[LayerKey], field: Any) -> SagPlan | None:
        if not settings.enabled or settings.scale <= 0:
            return None
        layer = next((k for k in available if k.block == "middle" and k.index == 0 and k.attn == "attn1"), None)
        if layer is None:
            raise field.error("SAG needs the self-attention of the model's middle block; this model has none")
        return cls(settings.scale, settings.blur_sigma, settings.threshold, settings.start, settings.end, layer)

    def scale_at(self, step: int, total: int) -> float:
        return self.scale if active_at(step, total, self.start, self.end) else 0.0
