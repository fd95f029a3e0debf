"""Style reference by Attention Distillation (Zhou, Gao, Chen, Huang, CVPR 2025), as AD-guided sampling.

At a guided step the reference latent, noised to the current level, runs through the UNet once
(no grad) and leaves the keys and values of the chosen self-attention layers.  Then, for ``iters``
inner iterations, the current latent ``z`` runs through the UNet with grad and on each chosen layer::

    O      = Attn(Q(z), K(z), V(z))                       the layer's own attention output
    target = sg[ Attn(tau * Q(z), K_ref, V_ref) ]         the same queries read the reference
    L_AD   = sum over layers of mean |O - target|          (L1, as the official losses.py; per image)
    L_c    = sum over layers of mean |Q(z) - sg[Q_content]|  (img2img content preservation)
    L      = L_AD + lambda * L_c

and Adam steps (a fresh optimizer per guided step, as the official pipeline) lower ``L``.  Like the official
sampler, Adam runs on the **VP-scaled latent** ``z / sqrt(1 + sigma^2)`` (what the UNet sees), so its learning
rate means what the paper's does; the displacement, brought back to k-diffusion units, is how far the official
sampler moves its latent at this noise level.  The hosts add it to the step's denoised prediction amplified by
:func:`step_gain`, so that a first-order step moves the next latent by that displacement (the official pipeline
moves the latent after its DDIM step; docs/methods/style.md derives the equivalence).

Everything here is pure torch: the hosts call :meth:`Recorder.attend` from their attention hooks
with projected ``q, k, v`` and run :func:`guided_displacement` with a function that calls their model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from lib_attn.layers import LayerKey, select
from lib_attn.methods.colorize.core import default_selector
from lib_attn.ops import active_at, attention, sd_sigmas

Tensor = torch.Tensor

CHECKPOINT_MODES = ("auto", "on", "off")
SD_SIGMA_MIN = 0.0292  # the smallest training sigma of SD1.x, SD2.x and SDXL (scaled-linear betas 0.00085-0.012)


def vp_scale(sigma: Tensor) -> Tensor:
    """``sqrt(1 + sigma^2)``: a k-diffusion latent is the VP latent times this (per row, B x 1 x 1 x 1)."""
    return (1 + sigma.double().view(-1, 1, 1, 1) ** 2).sqrt().float()


def step_gain(sigma: float, sigma_next: float) -> float:
    """``sigma / (sigma - sigma_next)``: a change ``d`` of the x0 prediction moves the next latent of a first-order
    step (Euler, DDIM: ``x' = x + (sigma_next - sigma) * (x - D) / sigma``) by ``(1 - sigma_next / sigma) * d``; to
    move it by ``d``, the prediction must move by ``d`` times this."""
    if sigma_next <= 0 or sigma_next >= sigma:
        return 1.0
    return sigma / (sigma - sigma_next)


@dataclass
class SigmaTrack:
    """The noise levels a pass has run at, to estimate the next one (the hooks see only the current sigma).

    The next sigma is estimated from the trend of the last two ratios (``r1^2 / r0``; one ratio where only one is
    known): within 1 % of the gain on a 20-step Karras or exponential schedule and within 6 % on a uniform one
    except at the three steps before its last, where its ratios fall fast (up to 2x there); 0 at the schedule's end
    (``SD_SIGMA_MIN``, or no step left); at a pass's first step, the geometric step to ``SD_SIGMA_MIN`` over the
    remaining steps (within 40 %)."""

    seen: list = field(default_factory=list)

    def observe(self, sigma: float) -> None:
        if not self.seen or abs(sigma - self.seen[-1]) > 1e-6 * max(sigma, 1e-12):
            self.seen.append(float(sigma))

    def next_sigma(self, sigma: float, remaining: int = 1) -> float:
        if sigma <= SD_SIGMA_MIN * 1.001 or remaining <= 0:
            return 0.0
        before = [s for s in self.seen if s > sigma * (1 + 1e-6)][-2:]
        if not before:
            return sigma * (SD_SIGMA_MIN / sigma) ** (1.0 / max(int(remaining), 1))
        r = sigma / before[-1]
        if len(before) == 2:
            r = min(r * r / (before[1] / before[0]), 0.999)
        return sigma * r

    def gain(self, sigma: float, remaining: int = 1) -> float:
        return step_gain(sigma, self.next_sigma(sigma, remaining))


def ad_loss(o: Tensor, q: Tensor, k_ref: Tensor, v_ref: Tensor, n_heads: int, tau: float = 1.0) -> Tensor:
    """Attention-distillation L1 between ``o`` (the layer's own output, B x N x C) and the detached output
    of the same queries on the reference's keys and values (B x M x C)."""
    with torch.no_grad():
        target = attention(q.detach(), k_ref, v_ref, n_heads, tau)
    return l1_per_image(o, target)


def l1_per_image(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute difference per image (row), summed over the rows: one image's gradient does not
    depend on the batch it is in."""
    dt = torch.promote_types(a.dtype, torch.float32)  # fp16/bf16 hosts: the loss in float32
    return (a.to(dt) - b.detach().to(dt)).abs().flatten(1).mean(1).sum()


def content_loss(q: Tensor, q_content: Tensor) -> Tensor:
    """L1 between the current queries and the (detached) content image's queries."""
    return l1_per_image(q, q_content)


@dataclass
class Recorder:
    """The state the attention hooks of one guided step share (one per generation, reset per step).

    ``mode``: None (hooks stay out of the way), ``"capture"`` (reference/content rows: keep K, V and Q)
    or ``"guided"`` (compute the loss terms).  ``ref_of[i]``: the references of guided row i, a tuple (several:
    their keys and values concatenated along the tokens, as the official code does with several style images);
    ``capture_rows``: what each row of the capture call is, ``("ref", r)`` or ``("content", i)``.
    """

    tau: float = 1.0
    content_weight: float = 0.0
    mode: str | None = None
    ref_of: Sequence[int] = ()
    capture_rows: Sequence[tuple[str, int]] = ()
    refs: dict = field(default_factory=dict)  # layer -> {r: (k, v)}
    content: dict = field(default_factory=dict)  # layer -> {i: q}
    terms: list = field(default_factory=list)

    def clear(self) -> None:
        self.mode = None
        self.refs, self.content, self.terms = {}, {}, []

    @contextlib.contextmanager
    def capturing(self, rows: Sequence[tuple[str, int]], ref_of: Sequence[int]) -> Iterator[None]:
        """The capture call: ``rows`` says what each of its rows is, ``ref_of`` the reference of each guided row
        (kept for the guided pass); the hooks record K, V (references) and Q (content).  Mode None after."""
        self.capture_rows, self.ref_of = rows, ref_of
        self.mode = "capture"
        try:
            yield
        finally:
            self.mode = None

    @contextlib.contextmanager
    def guided(self) -> Iterator[None]:
        """A guided call: the hooks compute the loss terms.  The mode found on entry is back after (a checkpointed
        block runs in it both inside a guided call and, for the recomputation in backward, after it)."""
        saved = self.mode
        self.mode = "guided"
        try:
            yield
        finally:
            self.mode = saved

    def attend(self, layer: object, q: Tensor, k: Tensor, v: Tensor, n_heads: int) -> Tensor:
        """Attention output (before ``to_out``) of a chosen self-attention layer, recording as the mode says."""
        o = attention(q, k, v, n_heads)
        if self.mode == "capture":
            for row, (what, idx) in enumerate(self.capture_rows):
                if what == "ref":
                    self.refs.setdefault(layer, {})[idx] = (k[row].detach(), v[row].detach())
                else:
                    self.content.setdefault(layer, {})[idx] = q[row].detach()
        elif self.mode == "guided":
            refs = self.refs.get(layer)
            if not refs:
                raise RuntimeError(f"Attention Toolkit: style reference features missing at {layer}")
            owners = [self.ref_of[r % len(self.ref_of)] for r in range(q.shape[0])]
            k_ref = torch.stack([torch.cat([refs[i][0] for i in own]) for own in owners]).to(q)
            v_ref = torch.stack([torch.cat([refs[i][1] for i in own]) for own in owners]).to(q)
            loss = ad_loss(o, q, k_ref, v_ref, n_heads, self.tau)
            contents = self.content.get(layer)
            if self.content_weight > 0 and contents:
                q_c = torch.stack([contents[r % len(contents)] for r in range(q.shape[0])]).to(q)
                loss = loss + self.content_weight * content_loss(q, q_c)
            self.terms.append(loss)
        return o

    def loss(self) -> Tensor | None:
        return torch.stack(self.terms).sum() if self.terms else None


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Grad on for the guided pass, inside the host's ``no_grad`` (A1111) or ``inference_mode`` (Forge);
    the caller's modes are back when the block ends, however it ends."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


@contextlib.contextmanager
def builtin_checkpointing_off(root: nn.Module) -> Iterator[None]:
    """ldm/sgm blocks built with ``use_checkpoint``/``checkpoint`` (SD2 and SDXL configs) route through their
    own CheckpointFunction when grad is on; its backward asks for the grads of the frozen weights and fails.
    Switch the flags off on the instances for the guided pass and put them back."""
    saved = []
    for m in root.modules():
        for attr in ("use_checkpoint", "checkpoint"):
            if isinstance(m.__dict__.get(attr), bool) and m.__dict__[attr]:
                saved.append((m, attr))
                m.__dict__[attr] = False
    try:
        yield
    finally:
        for m, attr in saved:
            m.__dict__[attr] = True


@contextlib.contextmanager
def normal_weights(root: nn.Module) -> Iterator[int]:
    """Forge loads weights under ``inference_mode``: autograd cannot save inference tensors for backward.
    Give the modules ordinary copies of those parameters and buffers for the guided pass (transient: the
    copies are dropped when the block ends).  Yields how many tensors were copied (0 on A1111)."""
    swapped = []
    with torch.inference_mode(False):
        for m in root.modules():
            for store in (m._parameters, m._buffers):
                for name, t in list(store.items()):
                    if t is not None and t.is_inference():
                        copy = t.clone()
                        store[name] = nn.Parameter(copy, requires_grad=False) if store is m._parameters else copy
                        swapped.append((store, name, t))
    try:
        yield len(swapped)
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t


@contextlib.contextmanager
def snapshot_saved_tensors(root: nn.Module) -> Iterator[None]:
    """Forge's transformer blocks add in place (``x += n``) onto tensors autograd saved, which fails the backward
    ("modified by an inplace operation").  Autograd keeps a copy of each activation it saves instead (weights are
    kept as they are), so later in-place adds cannot touch them.  The gradient is the exact one; the cost is one
    copy per saved activation.  (Gradient checkpointing cannot be combined with it: its recomputation would keep
    references that the in-place adds then overwrite, silently.)"""
    weights = {t.untyped_storage()._cdata for t in list(root.parameters()) + list(root.buffers())}

    def pack(t: Tensor) -> Tensor:
        return t if t.untyped_storage()._cdata in weights else t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's top-level blocks (the units of gradient checkpointing)."""
    out: list[nn.Module] = []
    for name in ("input_blocks", "middle_block", "output_blocks"):
        part = getattr(unet, name, None)
        if isinstance(part, nn.ModuleList):
            out += list(part)
        elif isinstance(part, nn.Module):
            out.append(part)
    return out


def checkpointed(recorder: Recorder) -> Callable[..., object]:
    """A forward wrapper (registry form) that checkpoints a block while ``recorder`` is in the guided pass."""

    def wrapper(module: nn.Module, call_next: Callable[..., object], *args: object, **kwargs: object) -> object:
        if recorder.mode != "guided" or not torch.is_grad_enabled():
            return call_next(*args, **kwargs)
        calls = 0

        def run(*a: object, **kw: object) -> object:
            nonlocal calls
            calls += 1
            if calls > 1:
                # the recomputation in backward calls the block's forward, not the block: run the block's forward
                # pre-hooks as a call would (A1111's --lowvram brings the block's weights to the GPU in one)
                a, kw = run_forward_pre_hooks(module, a, kw)
            # it runs after the guided call returned: replay it in the guided mode
            with recorder.guided():
                return call_next(*a, **kw)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    return wrapper


def run_forward_pre_hooks(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """What ``module(*args, **kwargs)`` does before its forward: each forward pre-hook, in order, may replace the
    arguments."""
    with_kwargs = module._forward_pre_hooks_with_kwargs
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    return args, kwargs


def self_attention_wrapper(recorder: Recorder, layer: object) -> Callable[..., object]:
    """A forward wrapper (registry form) for an ldm/sgm ``CrossAttention`` used as self-attention: out of the
    style calls it runs the host's attention; in them it projects q, k, v and lets ``recorder`` attend."""

    def wrapper(module: nn.Module, call_next: Callable[..., object], *args: object, **kwargs: object) -> object:
        if recorder.mode is None:
            return call_next(*args, **kwargs)
        x = args[0]
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        src = x if context is None else context
        q, k, v = module.to_q(x), module.to_k(src), module.to_v(src)
        return module.to_out(recorder.attend(layer, q, k, v, module.heads))

    return wrapper


def leaf(x: Tensor) -> Tensor:
    """The latent the inner steps optimize: a detached copy of ``x``, at least float32, requiring grad."""
    return x.detach().clone().to(torch.promote_types(x.dtype, torch.float32)).requires_grad_(True)


def guided_displacement(
    forward: Callable[[Tensor], object],
    recorder: Recorder,
    x: Tensor,
    lr: float,
    iters: int,
    first: tuple[Tensor, Tensor] | None = None,
    scale: Tensor | float = 1.0,
) -> tuple[Tensor, list[float]]:
    """Run ``iters`` Adam steps of lr ``lr`` on ``z = x / scale`` (``scale``: :func:`vp_scale` for a k-diffusion
    latent, so that Adam runs on the VP latent as the official sampler does; 1 where ``x`` is one already) against
    ``recorder``'s loss; ``forward(x')`` runs the model on ``x' = z * scale`` with the recorder in ``"guided"`` mode.
    ``first``: ``(z, loss)`` of a first forward already run (the host's own call on ``x``, with ``z`` the
    :func:`leaf` of ``x / scale`` it ran on), used as the first iteration's.  Returns ``(x' - x, losses)`` with the
    displacement detached and the graph freed; grad mode and the recorder's mode are restored."""
    losses: list[float] = []
    with grad_enabled():
        s = scale.to(x.device) if isinstance(scale, Tensor) else scale
        z = first[0] if first is not None else leaf(x / s)
        z0 = z.detach().clone()
        opt = torch.optim.Adam([z], lr=lr)
        for i in range(iters):
            opt.zero_grad(set_to_none=True)
            z.grad, loss = latent_grad(forward, recorder, z, s, x.dtype, first if i == 0 else None)
            losses.append(loss)
            opt.step()
        delta = ((z.detach() - z0) * s).to(x.dtype)
    return delta, losses


def latent_grad(
    forward: Callable[[Tensor], object],
    recorder: Recorder,
    z: Tensor,
    scale: Tensor | float,
    dtype: torch.dtype,
    first: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, float]:
    """The loss's gradient at the VP latent ``z`` (a leaf): ``forward(z * scale)`` runs the model with the recorder
    in ``"guided"`` mode; with ``first`` (``(leaf, loss)`` of a forward already run at ``z``'s value) its loss is
    used instead.  Only the latent's gradient is taken (nothing accumulates on the model's parameters); returns
    ``(gradient, loss)`` with the graph freed."""
    with grad_enabled():
        if first is not None:
            at, loss = first
        else:
            at = z
            recorder.terms = []
            with recorder.guided():
                forward((z * scale).to(dtype))
            loss = recorder.loss()
        if loss is None:
            raise RuntimeError("Attention Toolkit: the style layers were not reached by the model call")
        (grad,) = torch.autograd.grad(loss, at)
        recorder.terms = []
        return grad.to(z.dtype), float(loss.detach())


# ---- style transfer by optimization (the paper's, with a content image) -------------------------------


def transfer_timesteps(n: int, sigma_start: float) -> list[int]:
    """The timesteps of the optimization's ``n`` steps, high to low, spaced as diffusers' DDIM ``leading`` spacing
    (the official code sets a DDIM scheduler to ``n`` steps and takes one Adam step at each), over the training
    timesteps up to the one whose sigma is ``sigma_start`` (the host's first sigma: the whole range at denoising
    strength 1).  ``n`` 200 from the top gives the official 996, 991, ..., 1."""
    if n <= 0:
        return []
    sig = sd_sigmas()
    top = int(torch.searchsorted(sig, torch.tensor(float(sigma_start), dtype=torch.float64)).clamp(0, 999)) + 1
    ratio = top // n if n <= top else top / n  # diffusers: 1000 // n
    return [min(999, 1 + int((n - 1 - i) * ratio)) for i in range(n)]


@dataclass
class TransferState:
    """The paper's style transfer: Adam (one optimizer for the whole run) on the latent, which starts as the
    content image's and is fed to the UNet as it is (clean) with each step's timestep."""

    z: Tensor  # (B, C, h, w) float32 leaf
    lr: float
    opt: torch.optim.Optimizer = field(init=False)
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.opt = torch.optim.Adam([self.z], lr=self.lr)

    @classmethod
    def start(cls, content: Tensor, lr: float) -> TransferState:
        """Made outside the host's inference mode (Forge samples in it): Adam updates the latent in place."""
        with grad_enabled():
            return cls(leaf(content), lr)

    def step(
        self,
        forward: Callable[[Tensor], object],
        recorder: Recorder,
        scale: Tensor | float,
        dtype: torch.dtype,
        first: tuple[Tensor, Tensor] | None = None,
    ) -> float:
        """One Adam step on the latent against the recorder's loss (style + content); ``forward`` and ``scale`` as
        :func:`latent_grad`'s (``scale`` = sqrt(1 + sigma^2): the UNet sees the latent itself)."""
        with grad_enabled():
            self.opt.zero_grad(set_to_none=True)
            self.z.grad, loss = latent_grad(forward, recorder, self.z, scale, dtype, first)
            self.opt.step()
        self.losses.append(loss)
        return loss


@dataclass(frozen=True)
class StylePlan:
    """Style reference for one sampling pass (hires override applied)."""

    strength: float
    iters: int
    start: float
    end: float
    layers: tuple[LayerKey, ...]
    tau: float
    content_weight: float
    adain: str | None  # "noisy" (the official: the latent to the noised style latent), "denoised" or None
    checkpoint: bool
    transfer_lr: float | None = None  # style transfer by optimization (img2img): Adam's lr; None: guided sampling

    @property
    def transfer(self) -> bool:
        return self.transfer_lr is not None

    def active_at(self, step: int, total: int) -> bool:
        return self.transfer or active_at(step, total, self.start, self.end)


def build_plan(
    *,
    strength: float,
    iters: int,
    start: float,
    end: float,
    selector: str,
    available: Sequence[LayerKey],
    tau: float,
    content_weight: float,
    adain: bool,
    checkpoint: str,
    adain_mode: str = "noisy",
    transfer_lr: float | None = None,
) -> StylePlan | None:
    """None when the settings leave nothing to do; raises LayerSelectorError for a bad selector.  With
    ``transfer_lr`` (style transfer by optimization) the strength, iterations, interval and AdaIN do not apply."""
    if transfer_lr is not None:
        if transfer_lr <= 0:
            return None
        strength, iters, adain = 0.0, 1, False
    elif strength <= 0 or iters <= 0:
        return None
    sel = default_selector(available) if selector.strip().lower() in ("", "auto") else selector
    layers = tuple(select(sel, available, attn="attn1"))
    sdxl_like = any(k.index > 0 for k in available)  # SDXL: several transformer blocks per attention block
    ck = checkpoint == "on" or (checkpoint == "auto" and sdxl_like)
    return StylePlan(
        strength, iters, start, end, layers, tau, content_weight, adain_mode if adain else None, ck, transfer_lr
    )
