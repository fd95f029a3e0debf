"""Automatic edit masks from cross-attention (Zou et al., "Towards Efficient Diffusion-Based Image Editing
with Instant Attention Masks", InstDiffEdit, AAAI 2024).

During img2img sampling with the *edit* prompt, the cross-attention probabilities of the conditional rows
are summed over the chosen low-resolution layers, their heads and the steps so far (the "instant" mask
improves as steps go on).  At each step:

1. **Per-token maps.** One map per word of the prompt (sub-word tokens of a word averaged), and the start
   token's (BOS) map.  Each map is scaled by its maximum and resized to the latent size **bicubically**, as
   the official code's PIL ``resize`` does (:func:`resize_bicubic`; clipped to [0, 1] as its 8-bit image is);
   the BOS map is **inverted** (the start token soaks up attention in the background); then every map is
   min-max normalized.  With ``seeds`` > 1 the maps also average over that many noise draws of the input
   (:func:`draw_noise`, :func:`redrawn_inputs`), as the paper's three seeds.
2. **Index and refine (adaptive aggregation).** With one word, its map is the source.  Otherwise, decided
   once, at the first step: the *anchor* is the word whose map is most cosine-similar to the inverted BOS
   map; words with similarity to the anchor ``>= object_sim`` (0.9) are object words, ``<= other_sim``
   (0.6) "other" words, the rest are ignored.  Our addition: function words (articles, prepositions) take
   no role (see :data:`FUNCTION_WORDS` for why).  Source = ``clamp(norm(mean(object)) - norm(mean(other)), 0)``.
   Words the user names replace the automatic choice (they are the object words; nothing is subtracted).
3. **Post-process.** Two 5x5 Gaussian blurs (sigma 1.1, see :data:`GAUSS_5_SIGMA`), min-max normalize, binarize
   at ``threshold``; then our additions for a WebUI user: grow (dilate) by ``grow`` latent pixels and feather
   with a Gaussian of ``blur`` latent pixels (a soft mask in [0, 1]).
4. **Blend.** ``z <- z_src_t + M * (z - z_src_t)``: outside the mask the latent is the source noised to
   the current level, inside the edit proceeds.

Everything here is pure tensor code; the hosts collect the probabilities and do the blend in their own
sampling loops.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lib_attn.layers import LayerKey, select
from lib_attn.ops import blend, gaussian_blur, grid_of  # noqa: F401  (blend, grid_of: used through this module)

Tensor = torch.Tensor

DEFAULT_LAYERS = "auto"
# The sigma OpenCV's formula 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8 gives for a 5x5 kernel.  The official code's
# cv2.GaussianBlur(m, (5, 5), 0) does not use it: for a kernel of 7 taps or fewer with sigma 0, OpenCV takes a
# fixed table, [1, 4, 6, 4, 1] / 16, while this sigma gives [0.0708, 0.2445, 0.3695, 0.2445, 0.0708] (each tap
# within 0.009 of the table's).
GAUSS_5_SIGMA = 0.3 * ((5 - 1) * 0.5 - 1) + 0.8


# ---- layers --------------------------------------------------------------------------------------
def default_selector(available: Sequence[LayerKey]) -> str:
    """The paper's layers: cross-attention at the lowest resolution of the encoder and the decoder, the
    middle block excluded (SD1/SD2 at 512²: ``input.7-8`` and ``output.3-5``, the 16x16 maps; SDXL: its
    lowest level with attention, ``input.7-8`` and ``output.0-2``)."""
    ins = sorted({k.number for k in available if k.block == "input" and k.attn == "attn2"})
    outs = sorted({k.number for k in available if k.block == "output" and k.attn == "attn2"})
    if not ins and not outs:
        return "all"
    return ", ".join([f"input.{n}" for n in ins[-2:]] + [f"output.{n}" for n in outs[:3]])


@dataclass(frozen=True)
class EditMaskPlan:
    layers: tuple[LayerKey, ...]
    threshold: float = 0.2
    object_sim: float = 0.9
    other_sim: float = 0.6
    grow: int = 1  # latent pixels
    blur: float = 0.5  # latent pixels (Gaussian sigma); 0 = hard mask
    batch_average: bool = False
    seeds: int = 1  # noise draws the maps average over (1: the sampler's own rows only)


def build_plan(
    *,
    selector: str,
    available: Sequence[LayerKey],
    threshold: float,
    object_sim: float,
    other_sim: float,
    grow: int,
    blur: float,
    batch_average: bool,
    seeds: int = 1,
) -> EditMaskPlan:
    sel = default_selector(available) if selector.strip().lower() in ("", DEFAULT_LAYERS) else selector
    layers = tuple(select(sel, available, attn="attn2"))
    return EditMaskPlan(layers, threshold, object_sim, other_sim, grow, blur, batch_average, max(1, int(seeds)))


# ---- attention probabilities -----------------------------------------------------------------------
def attention_probs(q: Tensor, k: Tensor, n_heads: int, tokens: int = 77) -> Tensor:
    """Head-averaged attention probabilities ``(rows, N, tokens)`` of projected queries ``q`` (rows, N, C)
    and keys ``k`` (rows, T, C), over the first ``tokens`` keys (the prompt's first 77-token chunk), in
    float32."""
    q, k = q.float(), k.float()
    b, n, c = q.shape
    d = c // n_heads
    q = q.reshape(b, n, n_heads, d).transpose(1, 2)
    k = k.reshape(b, k.shape[1], n_heads, d).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)
    return p.mean(dim=1)[..., :tokens]


def cross_attention_probs(module: nn.Module, x: Tensor, context: Tensor, tokens: int = 77) -> Tensor:
    """:func:`attention_probs` of an ldm/sgm ``CrossAttention`` for hidden states ``x`` (rows, N, C) and
    text ``context`` (rows, T, C'), computed on the given rows only."""
    return attention_probs(module.to_q(x), module.to_k(context), int(module.heads), tokens)


@dataclass
class MapSum:
    """Running sum of one image's cross-attention maps: ``(tokens, h, w)`` at the first layer's grid."""

    total: Tensor | None = None
    count: int = 0

    def add(self, probs: Tensor, hw: tuple[int, int]) -> None:
        """``probs`` (N, T) of one row at a layer of grid ``hw``."""
        m = probs.detach().float().t().reshape(1, -1, *hw)
        if self.total is not None and tuple(self.total.shape[-2:]) != tuple(hw):
            m = F.interpolate(m, size=self.total.shape[-2:], mode="bilinear", align_corners=False)
        m = m[0]
        self.total = m.clone() if self.total is None else self.total + m
        self.count += 1

    def mean(self) -> Tensor | None:
        return None if self.total is None else self.total / self.count


# ---- several noise draws (the paper's seeds) -----------------------------------------------------------
# Draw k of an image comes from its seed mixed with k (golden-ratio step, mod 2^63): never the seed of another
# image of the batch (seed + k would be, and the host draws that image's own noise from it).
_SEED_STEP = 0x9E3779B97F4A7C15


def draw_seed(seed: int, k: int) -> int:
    """The generator seed of draw ``k`` (1, 2, ...) of an image whose generation seed is ``seed``."""
    return (int(seed) + k * _SEED_STEP) % (1 << 63)


def draw_noise(seeds: Sequence[int], shape: Sequence[int], draws: int) -> Tensor:
    """``(draws - 1, B, *shape)`` standard normal noise, float32 on the CPU: the extra draws ``k = 1 .. draws-1`` of
    each image (draw 0 is the sampler's own noise), each from a ``torch.Generator`` seeded with
    :func:`draw_seed`, so the same seed gives the same draws on every machine and with any batch."""
    out = torch.empty((max(draws - 1, 0), len(seeds), *shape))
    for k in range(1, draws):
        for i, s in enumerate(seeds):
            out[k - 1, i] = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(draw_seed(s, k)))
    return out


def redrawn_inputs(x: Tensor, noised: Tensor, redrawn: Tensor) -> Tensor:
    """The model inputs of the extra draws: ``x`` (B rows: the step's input, source kept outside the mask) with its
    noise swapped, ``x + redrawn[k] - noised`` where ``noised`` is the source brought to this step's level with
    the sampler's noise and ``redrawn[k]`` with draw k's.  Outside the mask that is exactly the source noised with
    draw k (the official seed-k latent); inside, the edit in progress under draw k's noise.  Returns
    ``((draws - 1) * B, ...)``, draw-major (row ``k * B + i``: image i)."""
    return (x[None] + redrawn - noised[None]).reshape(-1, *x.shape[1:])


# ---- prompt words ------------------------------------------------------------------------------------
_EXTRA_NETWORK = re.compile(r"<[^>]*>")
_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?")
_PIECES = re.compile(r"[^\W_]+(?:'[^\W_]+)?|[^\w\s]", re.UNICODE)


def prompt_pieces(prompt: str) -> list[str]:
    """The text the tokenizer sees, split as CLIP splits it before BPE: words and single punctuation marks.
    The WebUI's syntax goes first: the first ``AND`` sub-prompt, extra networks (``<lora:x:1>``), emphasis
    brackets and ``:weight`` suffixes (prompt editing ``[a:b:n]`` keeps both texts; name the words then)."""
    first = re.split(r"\bAND\b", prompt, maxsplit=1)[0]
    text = _WEIGHT.sub(" ", _EXTRA_NETWORK.sub(" ", first))
    text = re.sub(r"[()\[\]{}]", " ", text)
    return _PIECES.findall(text.lower())


def word_groups(
    pieces: Sequence[str], count_tokens: Callable[[str], int], limit: int = 75
) -> list[tuple[str, list[int]]]:
    """``(word, token positions)`` for the words of the first chunk (positions start at 1, after BOS);
    punctuation takes its positions but is no word."""
    out = []
    pos = 1
    for piece in pieces:
        n = max(int(count_tokens(piece)), 0)
        if pos + n - 1 > limit:
            break
        if any(ch.isalnum() for ch in piece):
            out.append((piece, list(range(pos, pos + n))))
        pos += n
    return out


# ---- maps to mask --------------------------------------------------------------------------------------
CUBIC_A = -0.5  # PIL's bicubic kernel (Keys, a = -0.5); torch's and OpenCV's use a = -0.75


def _cubic(x: Tensor, a: float = CUBIC_A) -> Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_matrix(n_in: int, n_out: int) -> Tensor:
    """``(n_out, n_in)`` weights of PIL's bicubic resampling along one axis (``ImagingResample``): pixel centres
    at ``(i + 0.5) * n_in / n_out``, a support of 2 input pixels (widened by the scale when shrinking), taps
    outside the image dropped and the rest renormalized to sum 1 (no border replication)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = torch.arange(lo, hi, dtype=torch.float64)
        k = _cubic((taps - center + 0.5) / filterscale)
        total = float(k.sum())
        w[i, lo:hi] = k / total if total != 0 else k
    return w


def resize_bicubic(m: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """Maps ``(..., h, w)`` resized to ``out_hw`` as the official code's ``PIL.Image.resize`` does (its default
    filter for 8-bit images is bicubic): separable, rows then columns.  The result can overshoot the input's
    range near edges (negative lobes); callers clip it as the 8-bit image is clipped."""
    h, w = m.shape[-2:]
    if (h, w) == tuple(out_hw):
        return m
    rows = bicubic_matrix(h, out_hw[0]).to(m.device, torch.float32)
    cols = bicubic_matrix(w, out_hw[1]).to(m.device, torch.float32)
    return rows @ m.float() @ cols.t()


def _minmax(m: Tensor) -> Tensor:
    lo, hi = m.amin(dim=(-2, -1), keepdim=True), m.amax(dim=(-2, -1), keepdim=True)
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def token_maps(mean_maps: Tensor, groups: Sequence[Sequence[int]], out_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(word maps (W, H, W'), inverted BOS map (H, W'))`` from mean maps ``(T, h, w)``."""
    maps = [mean_maps[0]] + [mean_maps[list(g)].mean(dim=0) for g in groups]
    m = torch.stack(maps)
    m = m / m.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    # bicubic as the official code (PIL); its 8-bit image clips the overshoot, so [0, 1] here
    m = resize_bicubic(m, out_hw).clamp(0, 1)
    m[0] = 1 - m[0]
    m = _minmax(m)
    return m[1:], m[0]


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a.flatten(1), b.flatten()[None], dim=1)


# Function words take part in no role (our addition).  A token whose logits are flat over the image gets a
# probability map proportional to 1/Z, the complement of the start token's share; after min-max normalization
# that map *is* the inverted start-token map, so an article would win the anchor vote on every image.
FUNCTION_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "of",
        "on",
        "in",
        "at",
        "to",
        "with",
        "by",
        "for",
        "from",
        "into",
        "onto",
        "over",
        "under",
        "near",
        "its",
        "his",
        "her",
        "their",
        "this",
        "that",
        "is",
        "are",
        "be",
    ]
)


def decide_roles(
    word_maps: Tensor, bos_inv: Tensor, object_sim: float, other_sim: float, words: Sequence[str] = ()
) -> Tensor:
    """+1 object, -1 other, 0 ignored, per word: the anchor is the content word most similar to the inverted
    BOS map; function words (``words`` given) are ignored unless the prompt has nothing else."""
    n = word_maps.shape[0]
    content = [i for i, w in enumerate(words) if w not in FUNCTION_WORDS] if words else list(range(n))
    content = content or list(range(n))
    roles = torch.zeros(n, dtype=torch.long)
    if len(content) == 1:
        roles[content[0]] = 1
        return roles
    sims = _cos(word_maps[content], bos_inv)
    anchor = content[int(sims.argmax())]
    sim = _cos(word_maps, word_maps[anchor])
    for i in content:
        roles[i] = 1 if sim[i] >= object_sim else (-1 if sim[i] <= other_sim else 0)
    roles[anchor] = 1
    return roles


def mask_source(word_maps: Tensor, roles: Tensor) -> Tensor:
    obj = word_maps[roles == 1]
    src = _minmax(obj.mean(dim=0))
    other = word_maps[roles == -1]
    if other.shape[0]:
        src = (src - _minmax(other.mean(dim=0))).clamp_min(0)
    return src


def finish(src: Tensor, threshold: float, grow: int = 0, blur: float = 0.0) -> Tensor:
    """The paper's post-processing (two 5x5 Gaussian blurs, min-max, binarize at ``threshold``), then
    ``grow`` pixels of dilation and a feather of ``blur`` pixels.  Returns a float mask in [0, 1]."""
    m = gaussian_blur(gaussian_blur(src, GAUSS_5_SIGMA, 5), GAUSS_5_SIGMA, 5)
    m = (_minmax(m) > threshold).to(src.dtype)
    if grow > 0:
        m = F.max_pool2d(m.reshape(1, 1, *m.shape[-2:]), 2 * grow + 1, stride=1, padding=grow).reshape(m.shape)
    return gaussian_blur(m, blur).clamp(0, 1)


@dataclass
class MaskBuilder:
    """One image's (or a shared batch's) instant mask: maps in, roles decided once, mask out."""

    plan: EditMaskPlan
    groups: list[tuple[str, list[int]]]
    forced: tuple[str, ...] = ()  # words named by the user
    roles: Tensor | None = None
    sums: MapSum = field(default_factory=MapSum)

    def mask(self, out_hw: tuple[int, int]) -> Tensor | None:
        """The mask ``(H, W)`` from the maps so far (None before any map)."""
        mean = self.sums.mean()
        if mean is None or not self.groups:
            return None
        words, bos_inv = token_maps(mean, [g for _, g in self.groups], out_hw)
        if self.roles is None:
            if self.forced:
                self.roles = torch.tensor([1 if w in self.forced else 0 for w, _ in self.groups], dtype=torch.long)
            else:
                self.roles = decide_roles(
                    words, bos_inv, self.plan.object_sim, self.plan.other_sim, [w for w, _ in self.groups]
                )
        return finish(mask_source(words, self.roles), self.plan.threshold, self.plan.grow, self.plan.blur)

    def object_words(self) -> list[str]:
        if self.roles is None:
            return []
        return [w for (w, _), r in zip(self.groups, self.roles.tolist(), strict=True) if r == 1]


def iou(a: Tensor, b: Tensor, threshold: float = 0.5) -> float:
    a, b = a > threshold, b > threshold
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


# ---- the DiffEdit baseline (benchmark only) ------------------------------------------------------------
def diffedit_mask(
    eps: Callable[[Tensor, Tensor, object], Tensor],
    z0: Tensor,
    sigma: float,
    target: object,
    source: object,
    samples: int = 10,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DiffEdit's mask (Couairon et al.; diffusers' defaults): ``samples`` noisings of ``z0`` at ``sigma``,
    |eps(target) - eps(source)| averaged over samples and channels, clamped at 3x its mean, rescaled,
    binarized at 0.5.  ``eps(x, sigma, cond)`` runs the model on a batch; both prompts go in one batch."""
    b = z0.shape[0]
    noise = torch.randn((samples, *z0.shape), generator=generator, dtype=z0.dtype).to(z0.device)
    x = (z0[None] + sigma * noise).reshape(samples * b, *z0.shape[1:])
    out = eps(torch.cat([x, x]), torch.full((2 * samples * b,), sigma), (target, source, samples * b))
    d = (out[: samples * b] - out[samples * b :]).abs().reshape(samples, b, *z0.shape[1:]).mean(dim=(0, 2))
    d = d.clamp(max=3 * d.mean(dim=(-2, -1), keepdim=True))
    d = d / d.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return (d > 0.5).to(z0.dtype)
