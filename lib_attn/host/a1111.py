"""AUTOMATIC1111 (1.9+) adapter.

Lifetime: ``begin(p, settings)`` (from ``Script.process``) puts a :class:`A1111Session` on ``p``
and wraps ``p.sample`` on that instance.  Each call of ``p.sample`` (one per batch; the hires
pass runs inside it) runs inside a ``with`` that registers the CFG callbacks and removes them,
and every attention patch, however sampling ends.

Passes: at the first CFG-denoiser call of a pass (first pass, hires pass, or after a model swap
by the refiner or the hires checkpoint), the patches of the previous pass are removed and those
of the new pass are put on the current UNet.

PAG (batched): in ``on_cfg_denoiser`` B perturbed rows (copies of each image's first cond row)
are inserted between the cond rows and the B uncond rows (see :mod:`lib_attn.batch`), so they
ride in the same model call as cond and uncond when ``batch_cond_uncond`` is on.  A forward
pre-hook on the UNet counts rows call by call, and the wrapped self-attention modules replace
the attention map by the identity on exactly those rows.  ``on_cfg_denoised`` reads the cond
and perturbed outputs, and ``on_cfg_after_cfg`` adds ``s * (cond - perturbed)``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from modules import script_callbacks, shared
from torch import nn

from lib_attn import batch as batchmod
from lib_attn.batch import BatchLayout
from lib_attn.guidance import pag_delta
from lib_attn.methods.pag import identity_attention
from lib_attn.registry import clean_leftovers
from lib_attn.session import Session, attach, check_settings_against, layer_keys, plan_pass
from lib_attn.settings import Settings, SettingsError

log = logging.getLogger("lib_attn")


def unet_of(sd_model: Any) -> nn.Module | None:
    model = getattr(sd_model, "model", None)
    return getattr(model, "diffusion_model", None)


def current_unet(denoiser: Any = None) -> nn.Module | None:
    """The UNet the denoiser is about to call (follows refiner / hires-checkpoint swaps)."""
    inner = getattr(getattr(denoiser, "inner_model", None), "inner_model", None)
    return unet_of(inner) or unet_of(shared.sd_model)


@dataclass
class _Step:
    layout: BatchLayout
    scale: float
    denoiser: Any
    cond_out: torch.Tensor | None = None
    pert_out: torch.Tensor | None = None


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


class A1111Session(Session):
    def __init__(self, p: Any, settings: Settings):
        super().__init__(settings)
        self.p = p
        self._step: _Step | None = None
        self._cursor = 0
        self._call: tuple[int, int] | None = None

    # ---- lifetime -------------------------------------------------------------------------
    @contextlib.contextmanager
    def sampling(self):
        """Scope of one ``p.sample`` call: callbacks registered, patches always removed."""
        unet = current_unet()
        if unet is not None:
            clean_leftovers(unet)
            check_settings_against(unet, self.settings)
        callbacks = (
            (script_callbacks.on_cfg_denoiser, self.on_cfg_denoiser),
            (script_callbacks.on_cfg_denoised, self.on_cfg_denoised),
            (script_callbacks.on_cfg_after_cfg, self.on_cfg_after_cfg),
        )
        try:
            for register, fn in callbacks:
                register(fn)
            yield self
        finally:
            for _, fn in callbacks:
                script_callbacks.remove_callbacks_for_function(fn)
            self.end_pass()
            self._step = None

    def end_pass(self) -> None:
        super().end_pass()
        self._call = None

    # ---- passes ---------------------------------------------------------------------------
    def _ensure_pass(self, denoiser: Any) -> None:
        p = getattr(denoiser, "p", None) or self.p
        unet = current_unet(denoiser)
        is_hr = bool(getattr(p, "is_hr_pass", False))
        key = (is_hr, id(unet))
        if key == self.pass_key:
            return
        self.end_pass()
        self.pass_key = key
        if unet is None:
            self.fail(SettingsError("model", "Model", "could not find the UNet of the loaded model"))
            return
        try:
            self.plan = plan_pass(self.settings, is_hr, layer_keys(unet))
        except SettingsError as e:
            self.fail(e)
            return
        if self.plan.pag is not None:
            for key_ in self.plan.pag.layers:
                self.patches.wrap_forward(unet.get_submodule(key_.module_path), self._attn1)
            self.patches.add_handle(unet.register_forward_pre_hook(self._pre_forward, with_kwargs=True))

    # ---- CFG callbacks ----------------------------------------------------------------------
    def on_cfg_denoiser(self, params: Any) -> None:
        self._step = None
        den = params.denoiser
        self._ensure_pass(den)
        self.step, self.total_steps = params.sampling_step, params.total_sampling_steps
        plan = self.plan.pag if self.plan else None
        if plan is None:
            return
        scale = plan.scale_at(params.sampling_step, params.total_sampling_steps, self._timestep(den, params.sigma))
        if scale <= 0:
            return
        try:
            layout = self._layout(params, den)
        except SettingsError as e:
            self.fail(e)
            return
        first, at = layout.first_cond, layout.n_cond
        params.x = batchmod.insert_rows(params.x, at, params.x[list(first)])
        params.sigma = batchmod.insert_rows(params.sigma, at, params.sigma[list(first)])
        if isinstance(params.image_cond, torch.Tensor) and _rows(params.image_cond) == layout.n_cond + layout.n_images:
            params.image_cond = batchmod.insert_rows(params.image_cond, at, params.image_cond[list(first)])
        tc = params.text_cond
        new_tc = batchmod.insert_rows(tc, at, batchmod.take_rows(tc, first))
        params.text_cond = _like(tc, new_tc) if isinstance(tc, Mapping) else new_tc
        self._step = _Step(layout, scale, den)
        self._cursor = 0

    def on_cfg_denoised(self, params: Any) -> None:
        st = self._step
        if st is None:
            return
        x_out = params.x
        st.cond_out = x_out[list(st.layout.first_cond)].clone()
        st.pert_out = x_out[st.layout.extra.start : st.layout.extra.stop].clone()

    def on_cfg_after_cfg(self, params: Any) -> None:
        st, self._step = self._step, None
        self._call = None
        if st is None or st.cond_out is None:
            return
        delta = pag_delta(st.cond_out, st.pert_out, st.scale)
        den = st.denoiser
        nmask = getattr(den, "nmask", None)
        if (
            getattr(den, "mask", None) is not None
            and nmask is not None
            and not getattr(den, "mask_before_denoising", False)
        ):
            delta = delta * nmask  # keep the inpainting blend: no change where the original is kept
        params.x = params.x + delta.to(params.x.dtype)

    # ---- helpers ----------------------------------------------------------------------------
    def _layout(self, params: Any, den: Any) -> BatchLayout:
        uncond = params.text_uncond
        n_total = _rows(params.x)
        n_images = _rows(uncond) if uncond is not None else 0
        p = getattr(den, "p", None) or self.p
        model = getattr(p, "sd_model", None) or shared.sd_model
        if getattr(model, "cond_stage_key", None) == "edit" and n_total != 2 * n_images:
            raise SettingsError("pag", "PAG", "InstructPix2Pix (edit) models are not supported by PAG")
        n_cond = n_total - n_images
        if n_images <= 0 or n_cond < n_images:
            raise SettingsError("pag", "PAG", f"unexpected CFG batch ({n_total} rows, {n_images} uncond)")
        if n_cond == n_images:
            return BatchLayout.from_repeats([1] * n_images)
        conds = getattr(p, "hr_c", None) if getattr(p, "is_hr_pass", False) else getattr(p, "c", None)
        repeats = [len(b) for b in getattr(conds, "batch", [])]
        if len(repeats) != n_images or sum(repeats) != n_cond:
            raise SettingsError("pag", "PAG", "could not tell which rows belong to which image (AND prompts)")
        return BatchLayout.from_repeats(repeats)

    @staticmethod
    def _timestep(den: Any, sigma: torch.Tensor) -> float | None:
        inner = getattr(den, "inner_model", None)
        s = sigma[:1]
        if hasattr(inner, "sigma_to_t"):
            return float(inner.sigma_to_t(s)[0])
        return float(s[0])  # timestep samplers (DDIM/PLMS/UniPC) pass the timestep as "sigma"

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._step is None:
            self._call = None
            return
        x = args[0] if args else kwargs.get("x")
        n = _rows(x)
        self._call = (self._cursor, n)
        self._cursor += n

    def _attn1(self, module: nn.Module, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        st, call = self._step, self._call
        if st is None or call is None:
            return call_next(*args, **kwargs)
        x = args[0]
        n = _rows(x)
        span = batchmod.local_span(st.layout.extra, call[0], call[1], n)
        if span is None:
            return call_next(*args, **kwargs)
        a, b = span
        parts = []
        if a > 0:
            parts.append(call_next(*_slice_args(args, n, 0, a), **_slice_kwargs(kwargs, n, 0, a)))
        parts.append(identity_attention(module, x[a:b]))
        if b < n:
            parts.append(call_next(*_slice_args(args, n, b, n), **_slice_kwargs(kwargs, n, b, n)))
        return torch.cat(parts, dim=0)


def _slice(v: Any, n: int, a: int, b: int) -> Any:
    return v[a:b] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v


def _slice_args(args: tuple, n: int, a: int, b: int) -> tuple:
    return tuple(_slice(v, n, a, b) for v in args)


def _slice_kwargs(kwargs: dict, n: int, a: int, b: int) -> dict:
    return {k: _slice(v, n, a, b) for k, v in kwargs.items()}


# ---- entry points used by the Script ----------------------------------------------------------
def begin(p: Any, settings: Settings) -> None:
    """Attach a session to ``p`` and wrap ``p.sample`` so every sampling call is scoped."""
    attach(p, A1111Session(p, settings))


def before_every_sampling(p: Any) -> None:
    """Nothing to do on A1111: passes are detected at the first CFG call of each pass."""


def cleanup_model() -> int:
    """Remove any patch of ours from the loaded model (script reload / defensive sweep)."""
    unet = unet_of(shared.sd_model)
    return clean_leftovers(unet) if unet is not None else 0
