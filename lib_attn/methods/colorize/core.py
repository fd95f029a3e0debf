"""Reference colorization through self-attention (Kosugi, "Leveraging the Powerful Attention of a
Pre-trained Diffusion Model for Exemplar-based Image Colorization").

Per guided step four streams meet at the chosen self-attention layers (``attn1``):

* the *input* stream: the grayscale input, noised to the current level (queries ``Q_in`` and keys ``K_in``);
* the *gray reference* stream: the reference made gray (keys ``K_refg``);
* the *color reference* stream: the reference in color (keys ``K_ref`` and values ``V_ref``);
* the *live* row being sampled (queries ``Q`` and values ``V`` of the current latent).

Dual attention (logits mixed before the softmax, as the official code does by default)::

    P   = softmax(gamma * s * Q_in K_refg^T + (1 - gamma) * s * Q K_ref^T)     per head, s = d^-1/2
    O   = P V_ref                                    reference colours moved to the matching input places
    O   = (1 - beta) * O + beta * softmax(s * Q_in K_in^T) V                  keep some of the input's own map
    out = to_out(O)                                  replaces the layer's attention output

The gray-to-gray term aligns by structure (no colour bias), the colour-to-colour term by the
colours being formed.  Classifier-free colorization guidance combines the transferred (``ct``) and the
plain (``nc``) predictions: ``nc + w * (ct - nc)``.

All functions here are pure tensor code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lib_attn import color
from lib_attn.layers import LayerKey, select
from lib_attn.ops import active_at, heads, merge_heads, sdpa

Tensor = torch.Tensor


@dataclass(frozen=True)
class Features:
    """Cached q/k/v of the capture streams at one layer and step: ``(rows, N, C)`` before the head split."""

    q_in: Tensor  # input stream queries, one row per image
    k_in: Tensor  # input stream keys
    k_refg: Tensor  # gray reference keys, one row per reference
    k_ref: Tensor  # colour reference keys
    v_ref: Tensor  # colour reference values


def dual_attention(
    q: Tensor,
    v: Tensor,
    q_in: Tensor,
    k_in: Tensor,
    k_refg: Tensor,
    k_ref: Tensor,
    v_ref: Tensor,
    n_heads: int,
    gamma: float,
    beta: float,
) -> Tensor:
    """The transferred attention output before ``to_out``: (B, N, C).

    ``q, v``: live queries/values (B, N, C); ``q_in, k_in``: the input stream's (B, N, C);
    ``k_refg, k_ref, v_ref``: the references' (B, M, C), already matched row by row to the live rows.
    The mixed logits are one scaled dot product with concatenated features:
    ``[sqrt(g) Q_in, sqrt(1-g) Q] . [sqrt(g) K_refg, sqrt(1-g) K_ref]^T = g Q_in K_refg^T + (1-g) Q K_ref^T``,
    so the fused attention kernel does the work (no N x M matrix is kept).
    """
    d = q.shape[-1] // n_heads
    scale = d**-0.5
    if gamma >= 1:  # gray-to-gray only: the map does not depend on the live row
        out = sdpa(heads(q_in, n_heads), heads(k_refg, n_heads), heads(v_ref, n_heads), scale)
    elif gamma <= 0:
        out = sdpa(heads(q, n_heads), heads(k_ref, n_heads), heads(v_ref, n_heads), scale)
    else:
        a, b = math.sqrt(gamma), math.sqrt(1.0 - gamma)
        qq = torch.cat([heads(q_in, n_heads) * a, heads(q, n_heads) * b], dim=-1)
        kk = torch.cat([heads(k_refg, n_heads) * a, heads(k_ref, n_heads) * b], dim=-1)
        out = sdpa(qq, kk, heads(v_ref, n_heads), scale)
    if beta:
        own = sdpa(heads(q_in, n_heads), heads(k_in, n_heads), heads(v, n_heads), scale)
        out = out * (1.0 - beta) + own * beta
    return merge_heads(out)


def reference_side(side: int, scale: float, multiple: int = 8) -> int:
    """Latent side of the reference streams for a generation latent side ``side``: ``side * scale`` rounded to a
    multiple of ``multiple`` latent pixels (the UNet's three downsamplings need it), at least ``multiple``, never
    above ``side``; ``scale >= 1`` keeps ``side`` itself."""
    if scale >= 1 or side <= multiple:
        return side
    return min(side, max(multiple, round(side * scale / multiple) * multiple))


def resize_spatial(t: Tensor, size: tuple[int, int]) -> Tensor:
    """A per-row spatial conditioning tensor (rows, C, h, w) brought to ``size``; (rows, C, 1, 1) and
    non-spatial tensors are returned as they are (A1111's placeholder image conditioning)."""
    if t.ndim != 4 or tuple(t.shape[-2:]) == tuple(size) or t.shape[-2:] == (1, 1):
        return t
    return F.interpolate(t.float(), size=size, mode="bilinear", align_corners=False).to(t.dtype)


def colorization_guidance(plain: Tensor, transferred: Tensor, scale: float) -> Tensor:
    """``nc + w * (ct - nc)``; equal to ``transferred`` at ``w = 1``."""
    return plain + (transferred - plain) * scale


STATS_BLUR_SIZE = 128  # the official post-processing blurs the reference to 128 x 128 before taking its a/b statistics


def blurred_reference(ref: Image.Image, size: tuple[int, int]) -> Tensor:
    """The reference as the official Lab post-processing sees it (OpenCV: ``INTER_AREA`` to 128 x 128, then
    ``INTER_LINEAR`` to the output's size): RGB in [0, 1], (3, H, W), for ``size`` = (W, H).  Its a/b statistics are
    the target of :func:`match_chroma_stats`."""
    small = ref.convert("RGB").resize((STATS_BLUR_SIZE, STATS_BLUR_SIZE), Image.Resampling.BOX)
    x = color.pil_to_tensor(small).float()[None]
    # half-pixel bilinear without antialiasing, as OpenCV's INTER_LINEAR (PIL's would antialias when shrinking)
    out = F.interpolate(x, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=False)
    return out[0].clamp(0, 1)


def match_chroma_stats(lab: Tensor, ref_lab: Tensor) -> Tensor:
    """Global mean/std of a and b of ``lab`` (3, H, W) matched to ``ref_lab``'s; L untouched."""
    out = lab.clone()
    for c in (1, 2):
        x, r = lab[c], ref_lab[c]
        std = x.std(unbiased=False)
        if float(std) < 1e-6:
            out[c] = x - x.mean() + r.mean()
        else:
            out[c] = (x - x.mean()) / std * r.std(unbiased=False) + r.mean()
    return out


@dataclass(frozen=True)
class LayerParams:
    gamma: float
    beta: float


@dataclass(frozen=True)
class ColorizePlan:
    """Reference colorization for one sampling pass."""

    guidance: float
    strength: float
    start: float
    end: float
    layers: tuple[LayerKey, ...]
    params: tuple[LayerParams, ...]  # per layer
    paper: bool = False  # the paper's regime: every step of its own loop transfers

    def active_at(self, step: int, total: int) -> bool:
        return self.paper or active_at(step, total, self.start, self.end)

    @property
    def needs_plain_rows(self) -> bool:
        return self.guidance != 1.0


DEFAULT_LAYERS = "auto"


def default_selector(available: Sequence[LayerKey]) -> str:
    """The official code's layers: the decoder's self-attention at the two highest resolutions that
    have attention (SD1/SD2: ``output_blocks`` 6-11; SDXL: ``output_blocks`` 3-5)."""
    outs = sorted({k.number for k in available if k.block == "output" and k.attn == "attn1"})
    if not outs:
        return "all"
    # the last six output blocks with attention on SD1/SD2 (two resolutions x three blocks)
    chosen = outs[-6:] if len(outs) >= 9 else outs[-3:]
    return ", ".join(f"output.{n}" for n in chosen)


def layer_params(
    layers: Sequence[LayerKey], widths: Sequence[int], fine: LayerParams, coarse: LayerParams
) -> tuple[LayerParams, ...]:
    """The official code picks (gamma, beta) by channel width: the narrowest selected layers (the
    highest resolution) get ``fine``, the others ``coarse``."""
    narrowest = min(widths) if widths else 0
    return tuple(fine if w == narrowest else coarse for w in widths[: len(layers)])


def build_plan(
    *,
    guidance_scale: float,
    strength: float,
    start: float,
    end: float,
    selector: str,
    available: Sequence[LayerKey],
    widths: dict[LayerKey, int],
    fine: LayerParams,
    coarse: LayerParams,
    paper: bool = False,
) -> ColorizePlan:
    sel = default_selector(available) if selector.strip().lower() in ("", DEFAULT_LAYERS) else selector
    layers = tuple(select(sel, available, attn="attn1"))
    params = layer_params(layers, [widths[k] for k in layers], fine, coarse)
    return ColorizePlan(guidance_scale, strength, start, end, layers, params, paper)


# ---- the paper's regime -------------------------------------------------------------------------------

PAPER_INVERSION = (1, 21, 41, 61, 81, 101, 121)  # DDIM inversion on the 50-step grid: 6 model calls, to t = 121
PAPER_SAMPLING = (121, 101, 81, 61, 41)  # then 5 deterministic steps, the last to the clean latent


def ddim_move(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Deterministic DDIM (eta 0) from ``sigma`` to ``sigma_next`` in k-diffusion units, both ways (inversion when
    ``sigma_next`` is higher): the denoised prediction kept, the noise part rescaled; to 0 it is the prediction."""
    if sigma_next <= 0:
        return denoised
    return denoised + (x - denoised) * (sigma_next / sigma)


def capture(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of an ldm/sgm ``CrossAttention`` self-attention for hidden states ``x`` (rows, N, C)."""
    return module.to_q(x), module.to_k(x), module.to_v(x)


def transfer(
    module: nn.Module, x: Tensor, feats: Features, p: LayerParams, owners: Sequence[int] | None = None
) -> Tensor:
    """The layer output (after ``to_out``) of the transferred rows ``x`` (B, N, C); ``feats`` rows match ``x``'s.

    With ``gamma = 1`` and ``beta = 0`` (the official defaults on the coarser layers) the output does not depend
    on ``x``: it is computed once per distinct ``owners`` entry (image) and shared by that image's rows."""
    if p.gamma >= 1 and not p.beta:
        if owners is None:
            owners = list(range(x.shape[0]))
        first = {o: i for i, o in reversed(list(enumerate(owners)))}
        uniq = list(first)
        pick = [first[o] for o in uniq]
        o = dual_attention(
            feats.q_in[pick],
            feats.q_in[pick],
            feats.q_in[pick],
            feats.k_in[pick],
            feats.k_refg[pick],
            feats.k_ref[pick],
            feats.v_ref[pick],
            module.heads,
            p.gamma,
            p.beta,
        )
        out = module.to_out(o)
        return out[[uniq.index(o_) for o_ in owners]]
    q, v = module.to_q(x), module.to_v(x)
    o = dual_attention(
        q, v, feats.q_in, feats.k_in, feats.k_refg, feats.k_ref, feats.v_ref, module.heads, p.gamma, p.beta
    )
    return module.to_out(o)
