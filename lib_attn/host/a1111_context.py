"""What the A1111 adapter gives the methods' hooks: the step in progress, the row span of the UNet call, private
calls, and the sampler's maths (k-diffusion samplers pass sigmas and predict x0; A1111's timestep samplers
DDIM/PLMS/UniPC pass timesteps and predict eps)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from modules import shared
from torch import nn

from lib_attn import batch as batchmod
from lib_attn.batch import BatchLayout
from lib_attn.hooks import Step
from lib_attn.host.services import SERVICES
from lib_attn.ops import grid_of


def unet_of(sd_model: Any) -> nn.Module | None:
    model = getattr(sd_model, "model", None)
    return getattr(model, "diffusion_model", None)


def current_unet(denoiser: Any = None) -> nn.Module | None:
    """The UNet the denoiser is about to call (follows refiner / hires-checkpoint swaps)."""
    inner = getattr(getattr(denoiser, "inner_model", None), "inner_model", None)
    return unet_of(inner) or unet_of(shared.sd_model)


class A1111Context:
    """What an A1111 hook may read and use (see :class:`lib_attn.hooks.A1111Hooks`); one per generation."""

    def __init__(self, session: Any):
        self._session = session
        self.model_call = session.model_call
        self.p = session.p
        self.services = SERVICES
        self.fail = session.fail
        self.plan: Any = None
        self.step = 0
        self.total_steps = 0
        self.call_index = 0  # the CFG denoiser's own call counter in this pass (0 at the pass's first evaluation)
        self.st: Step | None = None
        self.call: tuple[int, int] | None = None
        self.private_layout: BatchLayout | None = None  # layout of a private call in progress
        self.latent_hw: tuple[int, int] = (0, 0)  # of the UNet call in progress
        self.uncond_rows_transformed = False  # a method changes the uncond rows' output at this step
        self.cond_out: torch.Tensor | None = None  # after CFG: each image's first cond row of the model output
        self.denoiser: Any = None
        self.sigma: torch.Tensor | None = None  # the CFG denoiser's sigma (timestep samplers: timestep) this step

    @property
    def private(self) -> bool:
        return self.private_layout is not None

    def failed(self) -> bool:
        return self._session.error is not None

    def sd_model(self) -> Any:
        return getattr(self.p, "sd_model", None) or shared.sd_model

    unet = staticmethod(current_unet)

    # ---- calls --------------------------------------------------------------------------------
    def sub_call(self, call_next: Any, args: tuple, kwargs: dict, n: int, a: int, b: int) -> Any:
        """``call_next`` on rows a..b of this call; a wrapper further in sees those rows as a call of its own, at
        their global position."""
        saved = self.call
        if saved is not None:
            self.call = (saved[0] + a, b - a)
        try:
            return call_next(*batchmod.slice_args(args, n, a, b), **batchmod.slice_kwargs(kwargs, n, a, b))
        finally:
            self.call = saved

    @contextlib.contextmanager
    def call_span(self, start: int, rows: int):
        saved, self.call = self.call, (start, rows)
        try:
            yield
        finally:
            self.call = saved

    def first_cond_rows(self, x: torch.Tensor, field: Any) -> tuple[list[tuple[int, int]], tuple[int, int]] | None:
        """``(image, row in this call)`` of each image's first cond row in the model call in progress, and the
        layer's (h, w) grid; None when the call holds none.  Rows or a grid that do not fit the model call fail
        ``field`` (an extension reshaping attention, Hypertile)."""
        st, call = self.st, self.call
        if int(x.shape[0]) != call[1]:
            self.fail(field.error("the attention rows do not match the model call (an extension reshaping attention?)"))
            return None
        local = [(i, g - call[0]) for i, g in enumerate(st.layout.first_cond) if call[0] <= g < call[0] + call[1]]
        if not local:
            return None
        try:
            hw = grid_of(int(x.shape[1]), self.latent_hw)
        except ValueError as e:
            self.fail(field.error(f"{e} (Hypertile?)"))
            return None
        return local, hw

    def source_latent(self, params: Any, layout: BatchLayout, from_p: bool = False) -> torch.Tensor | None:
        """The source latent of the pass (the denoiser's ``init_latent``; with ``from_p`` also ``p.init_latent``), None
        where there is none with one row per image, or the rows are not the host's cond and uncond rows."""
        z0 = getattr(self.denoiser, "init_latent", None)
        if z0 is None and from_p:
            z0 = getattr(self.p, "init_latent", None)
        rows = layout.n_cond + layout.n_images
        ok = isinstance(z0, torch.Tensor) and int(z0.shape[0]) == layout.n_images and int(params.x.shape[0]) == rows
        return z0 if ok else None

    def keep_source_input(self, run: Any, params: Any, layout: BatchLayout) -> None:
        """The model input keeps ``run``'s source, noised to each row's level, outside its mask (every cond and
        uncond row as the host made them, before any rows of the methods are inserted)."""
        images = [layout.image_of_row(r) for r in range(layout.n_cond + layout.n_images)]
        noised = self.noised(run.z0[images].to(params.x), run.noise[images].to(params.x), params.sigma)
        params.x = run.blend_input(params.x, images, noised)

    # ---- the sampler's maths ------------------------------------------------------------------
    def is_kdiffusion(self, den: Any = None) -> bool:
        """Whether the CFG denoiser runs a k-diffusion sampler: those wrap the model in a k-diffusion denoiser (which
        has ``sigma_to_t``) and pass sigmas; A1111's timestep samplers (DDIM/PLMS/UniPC) pass timesteps."""
        return hasattr(getattr(den or self.denoiser, "inner_model", None), "sigma_to_t")

    def timestep(self) -> float | None:
        s = self.sigma[:1]
        if self.is_kdiffusion():
            return float(self.denoiser.inner_model.sigma_to_t(s)[0])
        return float(s[0])  # timestep samplers (DDIM/PLMS/UniPC) pass the timestep as "sigma"

    def _alpha(self, den: Any, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        inner = getattr(den, "inner_model", None)
        model = getattr(inner, "inner_model", None) or shared.sd_model
        return model.alphas_cumprod.to(like.device)[sigma.long()].view(-1, 1, 1, 1).to(like)

    def noised(self, z: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``z`` brought to the model input of the current step: k-diffusion samplers take ``z + sigma*noise``;
        the timestep samplers take ``sqrt(a)*z + sqrt(1-a)*noise``."""
        if self.is_kdiffusion():
            return z + noise * sigma.view(-1, 1, 1, 1).to(z)
        a = self._alpha(self.denoiser, sigma, z)
        return a.sqrt() * z + (1 - a).sqrt() * noise

    def noise_of(self, den: Any, x: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The noise that makes ``x`` from ``z`` at this step (the inverse of :meth:`noised`)."""
        if self.is_kdiffusion(den):
            return (x - z) / sigma.view(-1, 1, 1, 1).to(x)
        a = self._alpha(den, sigma, z)
        return (x - a.sqrt() * z) / (1 - a).sqrt()

    def unet_input_scale(self, den: Any, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
        """What the latent is multiplied by on its way into the UNet: k-diffusion's ``c_in``, 1 for the timestep
        samplers."""
        if self.is_kdiffusion(den):
            return den.inner_model.get_scalings(sigma)[-1].view(-1, 1, 1, 1).to(like)
        return 1.0

    def k_sigma(self, den: Any, sigma: torch.Tensor) -> torch.Tensor:
        """The k-diffusion noise level of a step (the timestep samplers pass a timestep: ``sqrt((1 - a) / a)``)."""
        if self.is_kdiffusion(den):
            return sigma.float()
        a = self._alpha(den, sigma, sigma.float()).flatten()
        return ((1 - a) / a).sqrt()

    def x_per_denoised(self, den: Any, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
        """How much the model input moves per unit of the x0 prediction at a fixed noise: 1 for k-diffusion,
        ``sqrt(a)`` for the timestep samplers."""
        return 1.0 if self.is_kdiffusion(den) else self._alpha(den, sigma, like).sqrt()

    def to_denoised(self, den: Any, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The x0 prediction of a step's output (k-diffusion: the output; timestep samplers: from eps)."""
        if self.is_kdiffusion(den):
            return out
        a = self._alpha(den, sigma, x)
        return (x - (1 - a).sqrt() * out) / a.sqrt()

    def output_delta(self, den: Any, sigma: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The change of a step's output that a change ``d`` of its x0 prediction makes, at a fixed model input
        (k-diffusion: ``d``; timestep samplers: the eps change ``-sqrt(a / (1 - a)) * d``)."""
        if self.is_kdiffusion(den):
            return d
        a = self._alpha(den, sigma, d)
        return -(a / (1 - a)).sqrt() * d

    def from_denoised(self, den: Any, x: torch.Tensor, sigma: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if self.is_kdiffusion(den):
            return d
        a = self._alpha(den, sigma, x)
        return (x - a.sqrt() * d) / (1 - a).sqrt()

    def cfg_scale(self) -> float | None:
        """The scale A1111's CFG applies to this sampling call's uncond rows, or None when it cannot be read or A1111
        may skip the uncond rows at some steps (negative guidance minimum sigma, skip early CFG)."""
        den = self.denoiser
        extra = getattr(getattr(den, "sampler", None), "sampler_extra_args", None) or {}
        scale = extra.get("cond_scale")
        if (
            not isinstance(scale, (int, float))
            or extra.get("s_min_uncond", 0)
            or getattr(shared.opts, "skip_early_cond", 0)
        ):
            return None
        return float(scale) * float(getattr(den, "cond_scale_miltiplier", 1.0))

    @staticmethod
    def in_one_call(layout: BatchLayout) -> bool:
        """Whether A1111 runs the uncond rows of this step together in one model call (the tail of it)."""
        if getattr(shared.opts, "batch_cond_uncond", True):
            return True
        # chunks of B rows from the first: the uncond rows (the last B) are one chunk when the rows before them are
        # whole chunks; every group of rows the methods insert has B rows, so that is when the cond rows are
        return layout.n_cond % layout.n_images == 0

    @staticmethod
    def in_batch(params: Any) -> bool:
        """Whether A1111 will run all rows of this step in one model call (capture rows can ride along)."""
        if not getattr(shared.opts, "batch_cond_uncond", True):
            return False
        tc, uc = params.text_cond, params.text_uncond
        if isinstance(tc, Mapping):
            tc, uc = tc.get("crossattn"), uc.get("crossattn") if isinstance(uc, Mapping) else None
        if tc is None or uc is None:
            return False
        return tc.shape[1] == uc.shape[1] or bool(getattr(shared.opts, "pad_cond_uncond", False))

    like = staticmethod(lambda orig, new: _like(orig, new))
    condition = staticmethod(lambda *a: _condition(*a))


def _like(orig: Any, new: Mapping) -> Any:
    """Rebuild a dict cond as the host's type (``prompt_parser.DictWithShape``)."""
    cls = type(orig)
    if cls is dict:
        return dict(new)
    try:
        return cls(dict(new))
    except TypeError:
        return cls(dict(new), new["crossattn"].shape)


def _rows(x: Any) -> int:
    return int(x.shape[0])


def _cat_conds(parts: list) -> Any:
    if parts and isinstance(parts[0], Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _condition(text: Any, image_cond: torch.Tensor | None, text_uncond: Any, x: torch.Tensor) -> dict:
    """The ``cond`` dict A1111's CFG denoiser passes to the model (``make_condition_dict``)."""
    if image_cond is None:
        image_cond = torch.zeros(x.shape[0], 5, 1, 1, dtype=x.dtype, device=x.device)
    if isinstance(text_uncond, Mapping):
        return {**text, "c_concat": [image_cond]}
    return {"c_crossattn": [text], "c_concat": [image_cond]}
