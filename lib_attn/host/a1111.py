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

Edit mask and masked upscaling: ``on_cfg_denoiser`` keeps the noised source outside their masks in the model
input (before any rows are inserted), ``on_cfg_after_cfg`` keeps the source in the prediction (``_keep_source``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from modules import script_callbacks, shared
from torch import nn

from lib_attn import batch as batchmod
from lib_attn import ops
from lib_attn.batch import BatchLayout
from lib_attn.host.services import SERVICES
from lib_attn.methods.colorize import core as col
from lib_attn.methods.edit_mask import core as em
from lib_attn.methods.edit_mask import run as edit_mask_io
from lib_attn.methods.pag.core import identity_attention, pag_delta
from lib_attn.methods.style import core as style
from lib_attn.methods.style import run as style_io
from lib_attn.methods.yoda import core as yd
from lib_attn.registry import clean_leftovers
from lib_attn.session import Session, attach, check_settings_against, layer_keys, layer_widths, make_runs, plan_pass
from lib_attn.settings import FIELD_BY_KEY, Settings, SettingsError

log = logging.getLogger("lib_attn")


def unet_of(sd_model: Any) -> nn.Module | None:
    model = getattr(sd_model, "model", None)
    return getattr(model, "diffusion_model", None)


def current_unet(denoiser: Any = None) -> nn.Module | None:
    """The UNet the denoiser is about to call (follows refiner / hires-checkpoint swaps)."""
    inner = getattr(getattr(denoiser, "inner_model", None), "inner_model", None)
    return unet_of(inner) or unet_of(shared.sd_model)


CAPTURE_GROUPS = ("col_in", "col_ref", "col_refg")


@dataclass
class _Step:
    layout: BatchLayout
    scale: float  # PAG scale at this step (0: no PAG rows)
    denoiser: Any
    colorize: bool = False  # colour transfer acts at this step
    cond_out: torch.Tensor | None = None
    pert_out: torch.Tensor | None = None
    plain_out: torch.Tensor | None = None
    plain_scale: float | None = None  # colorize: the plain rows are the uncond rows, which CFG weighs with this
    style_reuse: bool = False  # style: the references were captured and the host's uncond rows run the guided pass
    style_first: tuple | None = None  # style: (latent leaf, loss) of that first guided forward
    style_in: dict | None = None  # style: per image x, sigma, conditioning of the feature passes
    edit: bool = False  # the edit mask builds and blends at this step
    yoda: tuple | None = None  # masked upscaling: (model call, calls in the pass)
    blend_in: tuple | None = None  # edit mask / YODA: the first cond rows' model input and sigma (after blending)
    feats: dict = dataclasses.field(default_factory=dict)  # colorize: layer path -> {stream: (rows, N, C)}


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
        self._prepass: BatchLayout | None = None  # colorize capture call in progress
        self._shared_layers: set[str] = set()
        self.runs = make_runs(p, settings, SERVICES)
        self.colorize = self.runs.get("colorize")
        self.style = self.runs.get("style")
        self.recorder = style.Recorder()
        self.style_losses: list[list[float]] = []  # per guided step, the loss at each inner iteration
        self.edit = self.runs.get("edit_mask")
        self.yoda = self.runs.get("yoda")
        self._img2img = bool(getattr(p, "init_images", None))
        self._yoda_pass: bool | None = None  # is_hr_pass of the pass the YODA run follows
        self._latent_hw: tuple[int, int] = (0, 0)  # of the UNet call in progress

    # ---- lifetime -------------------------------------------------------------------------
    @contextlib.contextmanager
    def sampling(self):
        """Scope of one ``p.sample`` call: callbacks registered, patches always removed."""
        unet = current_unet()
        if unet is not None:
            clean_leftovers(unet)
            check_settings_against(unet, self.settings, img2img=self._img2img)
        if self.colorize is not None:
            self.colorize.encode(self.p, SERVICES.encode)
        if self.style is not None:
            self.style.begin(self.p)
        if self.edit is not None:
            self._count_tokens = edit_mask_io.token_counter(getattr(self.p, "sd_model", None) or shared.sd_model)
            self.edit.begin_batch()
        callbacks = (
            (script_callbacks.on_cfg_denoiser, self.guarded(self.on_cfg_denoiser)),
            (script_callbacks.on_cfg_denoised, self.guarded(self.on_cfg_denoised)),
            (script_callbacks.on_cfg_after_cfg, self.guarded(self.on_cfg_after_cfg)),
        )
        try:
            for register, fn in callbacks:
                register(fn)
            yield self
            if self.edit is not None and self.error is None:
                self.edit.finish_batch((int(self.p.width), int(self.p.height)), self.fail)
            if self.yoda is not None and self.error is None:
                self.yoda.finish_pass(self.fail)
        finally:
            if self.yoda is not None:
                self.yoda.begin_pass(None)
                self._yoda_pass = None
            for _, fn in callbacks:
                script_callbacks.remove_callbacks_for_function(fn)
            self.end_pass()
            self._step = None

    @contextlib.contextmanager
    def follow_up(self):
        """Edit mask with the inpainting final pass: the host samples once more, as an inpainting run with the
        final masks; none of our hooks is active then (they live inside ``sampling``)."""
        run = self.edit
        if run is None or run.settings.final != "inpaint" or run.final is None or self.error is not None:
            yield False
            return
        with run.inpainting(self.p):
            yield True

    def end_pass(self) -> None:
        super().end_pass()
        self._call = None
        self.recorder.clear()

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
        keys = layer_keys(unet)
        try:
            self.plan = plan_pass(self.settings, is_hr, keys, layer_widths(unet, keys), img2img=self._img2img)
        except SettingsError as e:
            self.fail(e)
            return
        if self.yoda is not None:
            if self._yoda_pass != is_hr:  # a new pass (not a refiner's model swap inside one): own source and map
                if self.error is None:
                    self.yoda.finish_pass(self.fail)  # the first pass before the hires pass
                self.yoda.begin_pass(self.plan.yoda)
                self._yoda_pass = is_hr
            if self.plan.yoda is not None:
                for key_ in self.plan.yoda.layers:
                    self.patches.wrap_forward(unet.get_submodule(key_.module_path), self._yoda_attn1)
        self._shared_layers = set()
        if self.plan.colorize is not None and self.plan.pag is not None:
            # a layer both methods act on: PAG (outer) lets colorization (inner) see the whole call
            self._shared_layers = {k.module_path for k in self.plan.colorize.layers} & {
                k.module_path for k in self.plan.pag.layers
            }
        if self.plan.colorize is not None:
            for key_, lp in zip(self.plan.colorize.layers, self.plan.colorize.params, strict=True):
                self.patches.wrap_forward(unet.get_submodule(key_.module_path), self._colorize_attn1(key_, lp))
        if self.plan.pag is not None:
            for key_ in self.plan.pag.layers:
                fn = self._attn1_over_colorize if key_.module_path in self._shared_layers else self._attn1
                self.patches.wrap_forward(unet.get_submodule(key_.module_path), fn)
        if self.plan.style is not None:
            self.recorder = style.Recorder(self.plan.style.tau, self.plan.style.content_weight)
            for key_ in self.plan.style.layers:
                self.patches.wrap_forward(
                    unet.get_submodule(key_.module_path), style.self_attention_wrapper(self.recorder, key_.module_path)
                )
            if self.plan.style.checkpoint:
                for block in style.blocks(unet):
                    self.patches.wrap_forward(block, style.checkpointed(self.recorder))
            self.patches.wrap_forward(unet, self._style_unet)
        if self.plan.edit_mask is not None and self.edit is not None:
            self.edit.plan = self.plan.edit_mask
            for key_ in self.plan.edit_mask.layers:
                self.patches.wrap_forward(unet.get_submodule(key_.module_path), self._edit_attn2)
        if self.plan.any:
            self.patches.add_handle(unet.register_forward_pre_hook(self._pre_forward, with_kwargs=True))

    # ---- CFG callbacks ----------------------------------------------------------------------
    def on_cfg_denoiser(self, params: Any) -> None:
        self._step = None
        den = params.denoiser
        self._ensure_pass(den)
        self.step, self.total_steps = params.sampling_step, params.total_sampling_steps
        plan = self.plan
        if plan is None or not plan.any:
            return
        pag_scale = 0.0
        if plan.pag is not None:
            pag_scale = plan.pag.scale_at(self.step, self.total_steps, self._timestep(den, params.sigma))
        colorize = plan.colorize is not None and plan.colorize.active_at(self.step, self.total_steps)
        styled = plan.style is not None and plan.style.active_at(self.step, self.total_steps)
        edit = plan.edit_mask is not None and self.edit is not None and self.error is None
        yoda = plan.yoda is not None and self.yoda is not None and self.error is None
        if pag_scale <= 0 and not colorize and not styled and not edit and not yoda:
            return
        try:
            layout = self._layout(params, den)
        except SettingsError as e:
            self.fail(e)
            return
        first = list(layout.first_cond)
        edit = edit and self._edit_input(params, layout, den)
        yoda_at = self._yoda_input(params, layout, den) if yoda else None
        blend_in = None
        if edit or yoda_at is not None:
            blend_in = params.x[first].detach().clone(), params.sigma[first].detach().clone()
        style_in = self._style_inputs(params, layout) if styled else None
        style_reuse = styled and not colorize and self._style_reuse(params, layout, den, style_in)
        groups: list[tuple[str, list[int], dict]] = []  # name, sources, row tensors
        if pag_scale > 0:
            groups.append(("pag", list(range(layout.n_images)), {}))
        capture: list[tuple[str, list[int], dict]] = []
        plain_scale = None
        if colorize:
            if plan.colorize.needs_plain_rows:
                plain_scale = self._plain_in_uncond(params, layout, den)
                if plain_scale is None:
                    groups.append(("col_plain", list(range(layout.n_images)), {}))
            capture = self._capture_rows(params, layout, den)
            if self._in_batch(params):  # the streams of the generation's size ride along; smaller ones go first
                size = tuple(params.x.shape[-2:])
                groups += [g for g in capture if tuple(g[2]["x"].shape[-2:]) == size]
                capture = [g for g in capture if tuple(g[2]["x"].shape[-2:]) != size]
        # no rows to insert (a capture call of its own, or style / edit mask only): the layout has no groups
        layout = self._insert_rows(params, layout, groups) if groups else layout.with_groups([])
        self._step = _Step(
            layout,
            pag_scale,
            den,
            colorize,
            plain_scale=plain_scale,
            style_in=style_in,
            style_reuse=style_reuse,
            edit=edit,
            yoda=yoda_at,
            blend_in=blend_in,
        )
        self._cursor = 0
        if capture:
            self._run_prepass(den, capture, params.text_uncond)

    @staticmethod
    def _insert_rows(params: Any, layout: BatchLayout, groups: list[tuple[str, list[int], dict]]) -> BatchLayout:
        """Insert the groups' rows (copies of each source image's first cond row unless a group gives its own x,
        sigma, image or text conditioning) between the cond and the uncond rows; the layout after insertion."""
        first = list(layout.first_cond)
        rows_x, rows_sigma, rows_ic, rows_tc = [], [], [], []
        ic = params.image_cond
        has_ic = isinstance(ic, torch.Tensor) and _rows(ic) == layout.n_cond + layout.n_images
        for _name, src, given in groups:
            at = [first[i] for i in src]
            rows_x.append(given.get("x", params.x[at]))
            rows_sigma.append(given.get("sigma", params.sigma[at]))
            if has_ic:
                rows_ic.append(given.get("image_cond", ic[at]))
            rows_tc.append(given.get("text", batchmod.take_rows(params.text_cond, at)))
        layout = layout.with_groups([(name, src) for name, src, _ in groups])
        at = layout.n_cond
        params.x = batchmod.insert_rows(params.x, at, torch.cat(rows_x))
        params.sigma = batchmod.insert_rows(params.sigma, at, torch.cat(rows_sigma))
        if has_ic:
            params.image_cond = batchmod.insert_rows(ic, at, torch.cat(rows_ic))
        tc = params.text_cond
        new_tc = batchmod.insert_rows(tc, at, _cat_conds(rows_tc))
        params.text_cond = _like(tc, new_tc) if isinstance(tc, Mapping) else new_tc
        return layout

    def on_cfg_denoised(self, params: Any) -> None:
        st = self._step
        if st is None:
            return
        x_out = params.x
        st.cond_out = x_out[list(st.layout.first_cond)].clone()
        pag, plain = st.layout.group("pag"), st.layout.group("col_plain")
        if len(pag):
            st.pert_out = x_out[pag.start : pag.stop].clone()
        if len(plain):
            st.plain_out = x_out[plain.start : plain.stop].clone()
        elif st.plain_scale is not None:
            st.plain_out = x_out[st.layout.uncond.start : st.layout.uncond.stop].clone()

    def on_cfg_after_cfg(self, params: Any) -> None:
        st, self._step = self._step, None
        self._call = None
        if st is None or st.cond_out is None:
            return
        delta = torch.zeros_like(st.cond_out)
        if st.pert_out is not None:
            delta = delta + pag_delta(st.cond_out, st.pert_out, st.scale)
        if st.plain_out is not None:
            # colorization guidance: plain + w*(transferred - plain) in place of the transferred cond
            w = self.plan.colorize.guidance
            # the host's CFG gave uncond + s*(cond - uncond): the transferred rows' CFG, or, when the plain rows
            # are the uncond rows, plain + s*(transferred - plain)
            host = (
                st.cond_out
                if st.plain_scale is None
                else col.colorization_guidance(st.plain_out, st.cond_out, st.plain_scale)
            )
            delta = delta + col.colorization_guidance(st.plain_out, st.cond_out, w) - host
        den = st.denoiser
        if st.style_in is not None and self.error is None:  # after a failure the generation fails anyway
            try:
                delta = delta + self._style_delta(den, st.style_in, params.x + delta, st)
            except Exception as e:  # the host would log and drop it: fail the generation with the cause
                self.fail(style_io.error_for(e))
        nmask = getattr(den, "nmask", None)
        if (
            getattr(den, "mask", None) is not None
            and nmask is not None
            and not getattr(den, "mask_before_denoising", False)
        ):
            delta = delta * nmask  # keep the inpainting blend: no change where the original is kept
        out = params.x + delta.to(params.x.dtype)
        if st.blend_in is not None and self.error is None:
            out = self._keep_source(st, den, out)
        params.x = out

    def _keep_source(self, st: _Step, den: Any, out: torch.Tensor) -> torch.Tensor:
        """Edit mask and masked upscaling: the source latent outside the masks, in x0 space (their masks multiply)."""
        x, sigma = st.blend_in
        d = None
        if st.edit and self.edit.update(self._latent_hw) is not None:
            d = self.edit.blend_denoised(_to_denoised(den, x, sigma, out))
        if st.yoda is not None and self.yoda.mask_for(*st.yoda) is not None:
            d = self.yoda.blend_denoised(d if d is not None else _to_denoised(den, x, sigma, out))
        return out if d is None else _from_denoised(den, x, sigma, d).to(out.dtype)

    # ---- automatic edit mask ----------------------------------------------------------------
    def _edit_input(self, params: Any, layout: BatchLayout, den: Any) -> bool:
        """At the first step of a batch: the source latent, the sampler's starting noise and the prompt
        words; later: the model input keeps the source (noised to each row's level) outside the mask."""
        run = self.edit
        first = list(layout.first_cond)
        z0 = getattr(den, "init_latent", None)
        if z0 is None:
            z0 = getattr(self.p, "init_latent", None)
        rows = layout.n_cond + layout.n_images
        if not isinstance(z0, torch.Tensor) or _rows(z0) != layout.n_images or _rows(params.x) != rows:
            self.fail(FIELD_BY_KEY["edit_mask_enabled"].error("no init latent to keep (img2img only)"))
            return False
        if not run.started:
            p = getattr(den, "p", None) or self.p
            prompts = list(getattr(p, "prompts", None) or [])[: layout.n_images]
            if len(prompts) != layout.n_images:
                prompts = [str(getattr(p, "prompt", ""))] * layout.n_images
            noise = _noise_of(den, params.x[first], z0.to(params.x), params.sigma[first])
            try:
                run.start(prompts, self._count_tokens, z0, noise)
            except SettingsError as e:
                self.fail(e)
                return False
        else:
            self._keep_source_input(run, params, layout, den)
        return True

    # ---- masked upscaling (YODA) --------------------------------------------------------------
    def _yoda_input(self, params: Any, layout: BatchLayout, den: Any) -> tuple | None:
        """First call of a pass: the pass's source latent (img2img's init latent, the hires pass's upscaled latent),
        the sampler's starting noise, the DINO map; every call: the model input keeps the source, noised to each
        row's level, outside this call's mask.  Returns (call, calls in the pass)."""
        run = self.yoda
        first = list(layout.first_cond)
        z0 = getattr(den, "init_latent", None)
        rows = layout.n_cond + layout.n_images
        if not isinstance(z0, torch.Tensor) or _rows(z0) != layout.n_images or _rows(params.x) != rows:
            self.fail(FIELD_BY_KEY["yoda_enabled"].error("this sampling pass has no source latent to upscale"))
            return None
        at = (int(getattr(den, "step", self.step)), SERVICES.pass_calls(den))
        if not run.started:
            noise = _noise_of(den, params.x[first], z0.to(params.x), params.sigma[first])
            try:
                run.start_pass(getattr(den, "p", None) or self.p, z0, noise)
            except SettingsError as e:
                self.fail(e)
                return None
            run.mask_for(*at)  # the first call's input is the noised source everywhere: nothing to blend
            return at
        if run.mask_for(*at) is not None:
            self._keep_source_input(run, params, layout, den)
        return at

    @staticmethod
    def _keep_source_input(run: Any, params: Any, layout: BatchLayout, den: Any) -> None:
        """The model input keeps ``run``'s source, noised to each row's level, outside its mask (every cond and
        uncond row as the host made them, before any rows of ours are inserted)."""
        plain = layout.with_groups([])  # the rows as the host made them: cond rows, then uncond rows
        images = [plain.image_of_row(r) for r in range(plain.n_cond + plain.n_images)]
        noised = _noised(den, run.z0[images].to(params.x), run.noise[images].to(params.x), params.sigma)
        params.x = run.blend_input(params.x, images, noised)

    def _yoda_attn1(self, module: nn.Module, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        """Self-attention of the "unet" source layers: at the pass's first call, the saliency of each image's
        first cond row (the output is the host's own)."""
        out = call_next(*args, **kwargs)
        st, run = self._step, self.yoda
        if st is None or self._call is None or st.yoda is None or self._prepass is not None or run.amap is not None:
            return out
        x = args[0]
        where = self._first_cond_rows(x, "yoda_source")
        if where is None:
            return out
        local, hw = where
        rows = [j for _, j in local]
        with torch.no_grad():
            sal = yd.self_attention_saliency(module.to_q(x[rows]), module.to_k(x[rows]), int(module.heads))
        for (i, _), s_ in zip(local, sal, strict=True):
            run.add_unet(i, s_, hw)
        return out

    def _first_cond_rows(self, x: torch.Tensor, field: str) -> tuple[list[tuple[int, int]], tuple[int, int]] | None:
        """For the maps of the edit mask and masked upscaling: ``(image, row in this call)`` of each image's first
        cond row in the model call in progress, and the layer's (h, w) grid; None when the call holds none.  Rows
        or a grid that do not fit the model call fail ``field`` (an extension reshaping attention, Hypertile)."""
        st, call = self._step, self._call
        if _rows(x) != call[1]:
            self.fail(
                FIELD_BY_KEY[field].error(
                    "the attention rows do not match the model call (an extension reshaping attention?)"
                )
            )
            return None
        local = [(i, g - call[0]) for i, g in enumerate(st.layout.first_cond) if call[0] <= g < call[0] + call[1]]
        if not local:
            return None
        try:
            hw = em.grid_of(int(x.shape[1]), self._latent_hw)
        except ValueError as e:
            self.fail(FIELD_BY_KEY[field].error(f"{e} (Hypertile?)"))
            return None
        return local, hw

    def _edit_attn2(self, module: nn.Module, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        """Cross-attention of the mask layers: the host's (optimized) attention gives the output; the
        probabilities are computed again only for each image's first cond row in this call."""
        out = call_next(*args, **kwargs)
        st = self._step
        if st is None or self._call is None or not st.edit or self._prepass is not None:
            return out
        x = args[0]
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        if not isinstance(context, torch.Tensor):
            self.fail(FIELD_BY_KEY["edit_mask_layers"].error("the cross-attention call has no text context"))
            return out
        where = self._first_cond_rows(x, "edit_mask_layers")
        if where is None:
            return out
        local, hw = where
        rows = [j for _, j in local]
        with torch.no_grad():
            probs = em.cross_attention_probs(module, x[rows], context[rows])
        for (i, _), pr in zip(local, probs, strict=True):
            self.edit.add(i, pr, hw)
        return out

    # ---- style reference --------------------------------------------------------------------
    def _style_inputs(self, params: Any, layout: BatchLayout) -> dict:
        """What the feature passes of this step need, per image: the latent being sampled, its sigma and
        the unconditional (negative-prompt) conditioning, as the paper's null-prompt feature extractor."""
        first = list(layout.first_cond)
        n = layout.n_images
        ic = params.image_cond
        has_ic = isinstance(ic, torch.Tensor) and _rows(ic) == layout.n_cond + n
        return {
            "x": params.x[first].detach().clone(),
            "sigma": params.sigma[first].detach().clone(),
            "text": params.text_uncond,
            "image_cond": ic[-n:] if has_ic else None,
        }

    def _style_reuse(self, params: Any, layout: BatchLayout, den: Any, inp: dict) -> bool:
        """Whether the host's uncond rows can be the first guided forward of this step (one UNet row per image saved):
        the guided pass runs the latent being sampled with the negative-prompt conditioning, which is what those rows
        are, when A1111 is sure to run them.  If so, the references are captured now, before the host's call."""
        if _cfg_scale(den) is None or not _in_one_call(layout):
            return False
        u = slice(_rows(params.x) - layout.n_images, None)  # no rows inserted yet: the uncond rows are the last B
        if not (torch.equal(params.x[u], inp["x"]) and torch.equal(params.sigma[u], inp["sigma"])):
            return False
        try:
            self._style_capture(den, inp)
        except Exception as e:  # the host would log and drop it: fail the generation with the cause
            self.fail(style_io.error_for(e))
            return False
        return True

    def _style_capture(self, den: Any, inp: dict) -> None:
        """One capture call (no grad): the references (and the img2img content) noised to this step's level."""
        plan, si, rec = self.plan.style, self.style, self.recorder
        x, sigma, text, ic = inp["x"], inp["sigma"], inp["text"], inp["image_cond"]
        z_ref = si.latents(self.p, SERVICES.encode, x.shape, x)
        rows, clean, noise, owner, ref_of = si.capture_batch(z_ref, x, self.step, plan.content_weight > 0)
        rec.clear()
        x_cap = _noised(den, clean, noise, sigma[owner])
        with (
            style.builtin_checkpointing_off(current_unet(den)),
            torch.inference_mode(False),
            torch.no_grad(),
            rec.capturing(rows, ref_of),
        ):
            den.inner_model(x_cap, sigma[owner], cond=self._style_cond(text, ic, owner, x))

    def _style_unet(self, module: nn.Module, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        """UNet forward wrapper: in a step whose guided pass reuses the host's uncond rows, those rows (the tail of
        the call) run with grad and the style layers computing the loss; the other rows run as they are."""
        st, call = self._step, self._call
        if st is None or call is None or not st.style_reuse or st.style_first is not None or self._prepass is not None:
            return call_next(*args, **kwargs)
        start, n = call
        u = st.layout.uncond
        if u.stop != start + n or u.start < start:  # not the whole uncond span at the end of this call
            return call_next(*args, **kwargs)
        a = u.start - start
        sub_args, sub_kwargs = _slice_args(args, n, a, n), _slice_kwargs(kwargs, n, a, n)
        x, rec, latent = sub_args[0], self.recorder, st.style_in["x"]
        c_in = _unet_input_scale(st.denoiser, st.style_in["sigma"], latent)
        probe = latent * c_in
        # not the host's input after all (an inpainting model's concatenated channels): the call runs as it is and
        # the guided forward runs on its own later; the dtype may differ (A1111's upcast sampling casts the input
        # to the UNet's dtype first)
        if probe.shape != x.shape or not torch.equal(probe.to(x.dtype), x):
            return call_next(*args, **kwargs)
        head = self._sub_call(call_next, args, kwargs, n, 0, a) if a > 0 else None
        saved = self._call
        self._call = (start + a, n - a)
        try:
            with style.grad_enabled():
                # the leaf is the latent itself (as in the separate guided forward); the UNet sees it scaled
                z = style.leaf(latent)
                x_in = z.to(latent.dtype) * c_in
                rec.terms = []
                with style.builtin_checkpointing_off(module), style.normal_weights(module), rec.guided():
                    tail = call_next(x_in.to(x.dtype), *sub_args[1:], **sub_kwargs)
                loss = rec.loss()
                rec.terms = []
        except Exception as e:
            raise style_io.error_for(e) from e
        finally:
            self._call = saved
        if loss is None:
            raise RuntimeError("Attention Toolkit: the style layers were not reached by the model call")
        st.style_first = (z, loss)
        tail = tail.detach()
        return tail if head is None else torch.cat([head, tail.to(head.dtype)])

    def _style_delta(self, den: Any, inp: dict, out: torch.Tensor, st: _Step) -> torch.Tensor:
        """The change the style guidance makes to this step's prediction ``out`` (B rows; denoised for
        k-diffusion samplers, eps for A1111's timestep samplers).  The AD gradient is taken at the latent being
        sampled (classifier-guidance style); its displacement is added to the (AdaIN-matched) prediction."""
        plan, si = self.plan.style, self.style
        x, sigma, text, ic = inp["x"], inp["sigma"], inp["text"], inp["image_cond"]
        n = x.shape[0]
        denoised = _to_denoised(den, x, sigma, out)
        target = denoised
        if plan.adain:
            z_ref = si.latents(self.p, SERVICES.encode, x.shape, x)
            target = ops.adain(denoised.float(), z_ref[si.ref_index(n)].float()).to(denoised.dtype)
        if not st.style_reuse:
            self._style_capture(den, inp)
        unet = current_unet(den)
        rec = self.recorder
        cond = self._style_cond(text, ic, list(range(n)), x)
        c = _x_per_denoised(den, sigma, x)
        first, st.style_first = st.style_first, None
        with style.builtin_checkpointing_off(unet), style.normal_weights(unet):
            disp, losses = style.guided_displacement(
                lambda z: den.inner_model(z, sigma, cond=cond), rec, x, plan.strength, plan.iters, first=first
            )
        rec.clear()
        self.style_losses.append(losses)
        return _from_denoised(den, x, sigma, target + disp / c) - out

    @staticmethod
    def _style_cond(text: Any, ic: torch.Tensor | None, rows: list[int], x: torch.Tensor) -> dict:
        t = batchmod.take_rows(text, rows)
        if isinstance(text, Mapping):
            t = _like(text, t)
        return _condition(t, ic[rows] if ic is not None else None, text, x[:1].expand(len(rows), -1, -1, -1))

    # ---- colorization ---------------------------------------------------------------------
    def _in_batch(self, params: Any) -> bool:
        """Whether A1111 will run all rows of this step in one model call (capture rows can ride along)."""
        if not getattr(shared.opts, "batch_cond_uncond", True):
            return False
        tc, uc = params.text_cond, params.text_uncond
        if isinstance(tc, Mapping):
            tc, uc = tc.get("crossattn"), uc.get("crossattn") if isinstance(uc, Mapping) else None
        if tc is None or uc is None:
            return False
        return tc.shape[1] == uc.shape[1] or bool(getattr(shared.opts, "pad_cond_uncond", False))

    def _plain_in_uncond(self, params: Any, layout: BatchLayout, den: Any) -> float | None:
        """Whether the uncond rows can be the colorization guidance's plain rows (one row per image saved): when
        CFG weighs the uncond rows out (scale 1; their conditioning then becomes the cond's) or they carry the
        same conditioning as the cond rows (empty prompt and negative prompt), so a non-transferred uncond row is
        the plain cond row.  Returns the scale CFG applies (the guidance corrects for it), or None: AND prompts,
        A1111 skipping uncond rows at some steps, or a scale that cannot be read."""
        if layout.n_cond != layout.n_images:
            return None
        scale = _cfg_scale(den)
        if scale is None:
            return None
        ic, n = params.image_cond, layout.n_images  # no rows inserted yet: the uncond rows are the last B
        has_ic = isinstance(ic, torch.Tensor) and _rows(ic) == layout.n_cond + n
        if has_ic and not torch.equal(ic[list(layout.first_cond)], ic[-n:]):  # unCLIP: the uncond rows' is zeros
            return None
        tc, uc = params.text_cond, params.text_uncond
        if _same_cond(tc, uc):
            return scale
        if scale != 1.0:
            return None
        params.text_uncond = tc  # scale 1: the uncond rows' result is not used by CFG; they become plain cond rows
        return scale

    def _capture_rows(self, params: Any, layout: BatchLayout, den: Any) -> list[tuple[str, list[int], dict]]:
        """The capture streams at this step: input (gray), colour reference, gray reference, noised to
        the current level with fixed per-generation noise.  Each row borrows sigma, text and image
        conditioning from the first cond row of an image that uses it."""
        ci = self.colorize
        first = list(layout.first_cond)
        ref_of = ci.ref_index(layout.n_images)
        ic = params.image_cond
        has_ic = isinstance(ic, torch.Tensor) and _rows(ic) == layout.n_cond + layout.n_images
        images = list(range(layout.n_images))
        refs = sorted(set(ref_of))
        out = []
        for name, z, noise, src, owner in (
            ("col_in", ci.z_in, ci.noise_in, images, images),
            ("col_ref", ci.z_ref, ci.noise_ref, refs, [ref_of.index(r) for r in refs]),
            ("col_refg", ci.z_refg, ci.noise_ref, refs, [ref_of.index(r) for r in refs]),
        ):
            at = [first[i] for i in owner]
            sigma = params.sigma[at]
            given = {
                "x": _noised(den, z[src].to(params.x), noise[src].to(params.x), sigma),
                "sigma": sigma,
                "text": batchmod.take_rows(params.text_cond, at),
            }
            if has_ic:
                given["image_cond"] = col.resize_spatial(ic[at], tuple(z.shape[-2:]))
            out.append((name, src, given))
        return out

    def _run_prepass(self, den: Any, capture: list, text_uncond: Any) -> None:
        """Extra model calls on the capture rows that do not ride in the step's call, one per latent size."""
        sizes = dict.fromkeys(tuple(g["x"].shape[-2:]) for _, _, g in capture)
        for size in sizes:
            self._prepass_call(den, [c for c in capture if tuple(c[2]["x"].shape[-2:]) == size], text_uncond)

    def _prepass_call(self, den: Any, capture: list, text_uncond: Any) -> None:
        layout = BatchLayout(0, 0, (), (), tuple((name, tuple(src)) for name, src, _ in capture))
        x = torch.cat([g["x"] for _, _, g in capture])
        sigma = torch.cat([g["sigma"] for _, _, g in capture])
        text = _cat_conds([g["text"] for _, _, g in capture])
        ics = [g.get("image_cond") for _, _, g in capture]
        cond = _condition(text, torch.cat(ics) if all(i is not None for i in ics) else None, text_uncond, x)
        saved = self._cursor
        self._prepass, self._cursor = layout, 0
        try:
            den.inner_model(x, sigma, cond=cond)
        except BaseException as e:
            # the host reports and swallows errors raised in CFG callbacks: keep the real cause, so the
            # generation fails with it, and run this step without the transfer
            self.fail(e if isinstance(e, Exception) else RuntimeError(f"Attention Toolkit: capture call ended: {e!r}"))
            if self._step is not None:
                self._step.colorize = False
            if not isinstance(e, Exception):
                raise
        finally:
            self._prepass, self._cursor, self._call = None, saved, None

    def _colorize_attn1(self, key: Any, lp: col.LayerParams) -> Any:
        path = key.module_path

        def attn1(module: nn.Module, call_next: Any, *args: Any, **kwargs: Any) -> Any:
            st, call = self._step, self._call
            if st is None or call is None or not st.colorize:
                return call_next(*args, **kwargs)
            x = args[0]
            n = _rows(x)
            layout = self._prepass or st.layout
            if n != call[1]:
                self.fail(
                    FIELD_BY_KEY["colorize_enabled"].error(
                        "the attention rows do not match the model call (Hypertile?); switch Hypertile off"
                    )
                )
                return call_next(*args, **kwargs)
            store = st.feats.setdefault(path, {})
            for name in CAPTURE_GROUPS:
                span = batchmod.local_span(layout.group(name), call[0], call[1], n)
                if span is not None:
                    q, k, v = col.capture(module, x[span[0] : span[1]])
                    src = layout.sources(name)[span[0] + call[0] - layout.group(name).start :][: span[1] - span[0]]
                    store.setdefault(name, {}).update({s: (q[j], k[j], v[j]) for j, s in enumerate(src)})
            if self._prepass is not None:
                return call_next(*args, **kwargs)
            # transferred rows: cond, PAG and uncond rows; the plain and capture rows keep plain attention
            owners = [self._owner(layout, call[0] + j, st.plain_scale is not None) for j in range(n)]
            rows = [j for j, i in enumerate(owners) if i is not None]
            if not rows:
                return call_next(*args, **kwargs)
            try:
                feats = self._features(store, layout, [owners[j] for j in rows])
            except KeyError:
                self.fail(RuntimeError("Attention Toolkit: colorization features missing at " + path))
                return call_next(*args, **kwargs)
            moved = col.transfer(module, x[rows], feats, lp, [owners[j] for j in rows])
            s = self.plan.colorize.strength
            if s < 1:
                out = call_next(*args, **kwargs)
                return _put_rows(out, rows, moved.to(out.dtype) * s + out[rows] * (1 - s))
            # strength 1: the plain attention runs only on the rows that keep it (runs of consecutive rows)
            parts, j = [], 0
            pos = {r: i for i, r in enumerate(rows)}
            while j < n:
                k = j
                keep = j not in pos
                while k < n and (k not in pos) == keep:
                    k += 1
                if keep:
                    parts.append(self._sub_call(call_next, args, kwargs, n, j, k))
                else:
                    parts.append(moved[pos[j] : pos[j] + (k - j)])
                j = k
            return torch.cat([p_.to(parts[0].dtype) for p_ in parts], dim=0)

        return attn1

    def _sub_call(self, call_next: Any, args: tuple, kwargs: dict, n: int, a: int, b: int) -> Any:
        """``call_next`` on rows a..b of this call; a wrapper further in (another method on the same layer)
        sees those rows as a call of its own, at their global position."""
        saved = self._call
        if saved is not None:
            self._call = (saved[0] + a, b - a)
        try:
            return call_next(*_slice_args(args, n, a, b), **_slice_kwargs(kwargs, n, a, b))
        finally:
            self._call = saved

    @staticmethod
    def _owner(layout: BatchLayout, row: int, plain_uncond: bool = False) -> int | None:
        """The image whose colours a row takes: cond, uncond (unless they are the plain rows) and PAG rows; None
        for plain and capture rows."""
        if plain_uncond and row in layout.uncond:
            return None
        i = layout.image_of_row(row)
        pag = layout.group("pag")
        if i is None and row in pag:
            i = layout.sources("pag")[row - pag.start]
        return i

    def _features(self, store: dict, layout: BatchLayout, owners: list[int]) -> col.Features:
        ref_of = self.colorize.ref_index(layout.n_images)
        q_in = torch.stack([store["col_in"][i][0] for i in owners])
        k_in = torch.stack([store["col_in"][i][1] for i in owners])
        k_refg = torch.stack([store["col_refg"][ref_of[i]][1] for i in owners])
        k_ref = torch.stack([store["col_ref"][ref_of[i]][1] for i in owners])
        v_ref = torch.stack([store["col_ref"][ref_of[i]][2] for i in owners])
        return col.Features(q_in, k_in, k_refg, k_ref, v_ref)

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
        s = sigma[:1]
        if _is_kdiffusion(den):
            return float(den.inner_model.sigma_to_t(s)[0])
        return float(s[0])  # timestep samplers (DDIM/PLMS/UniPC) pass the timestep as "sigma"

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._step is None and self._prepass is None:
            self._call = None
            return
        x = args[0] if args else kwargs.get("x")
        n = _rows(x)
        self._latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
        self._call = (self._cursor, n)
        self._cursor += n

    def _attn1(self, module: nn.Module, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        st, call = self._step, self._call
        if st is None or call is None:
            return call_next(*args, **kwargs)
        x = args[0]
        n = _rows(x)
        if self._prepass is not None:
            return call_next(*args, **kwargs)
        span = batchmod.local_span(st.layout.group("pag"), call[0], call[1], n)
        if span is None:
            return call_next(*args, **kwargs)
        a, b = span
        parts = []
        if a > 0:
            parts.append(self._sub_call(call_next, args, kwargs, n, 0, a))
        parts.append(identity_attention(module, x[a:b]))
        if b < n:
            parts.append(self._sub_call(call_next, args, kwargs, n, b, n))
        return torch.cat(parts, dim=0)

    def _attn1_over_colorize(self, module: nn.Module, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        """PAG on a layer that colorization also patches: the inner (colorization) wrapper runs on the whole
        call, so it sees the capture rows before the rows it transfers; the PAG rows are then replaced."""
        out = call_next(*args, **kwargs)
        st, call = self._step, self._call
        if st is None or call is None or self._prepass is not None:
            return out
        n = _rows(args[0])
        span = batchmod.local_span(st.layout.group("pag"), call[0], call[1], n)
        if span is None:
            return out
        a, b = span
        return _put_rows(out, list(range(a, b)), identity_attention(module, args[0][a:b]).to(out.dtype))


def _in_one_call(layout: BatchLayout) -> bool:
    """Whether A1111 runs the uncond rows of this step together in one model call (the tail of it)."""
    if getattr(shared.opts, "batch_cond_uncond", True):
        return True
    # chunks of B rows from the first: the uncond rows (the last B) are one chunk when the rows before them are whole
    # chunks; every group of rows the methods insert has B rows, so that is when the cond rows are
    return layout.n_cond % layout.n_images == 0


def _cfg_scale(den: Any) -> float | None:
    """The scale A1111's CFG applies to this sampling call's uncond rows, or None when it cannot be read or A1111
    may skip the uncond rows at some steps (negative guidance minimum sigma, skip early CFG): then they are not
    sure to be run, and nothing may rely on them."""
    extra = getattr(getattr(den, "sampler", None), "sampler_extra_args", None) or {}
    scale = extra.get("cond_scale")
    if (
        not isinstance(scale, (int, float))
        or extra.get("s_min_uncond", 0)
        or getattr(shared.opts, "skip_early_cond", 0)
    ):
        return None
    return float(scale) * float(getattr(den, "cond_scale_miltiplier", 1.0))


def _same_cond(a: Any, b: Any) -> bool:
    """The same text conditioning, row for row (tensors, or SDXL's dicts of tensors)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_cond(a[k], b[k]) for k in a)
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


def _put_rows(out: torch.Tensor, rows: list[int], values: torch.Tensor) -> torch.Tensor:
    out = out.clone()
    out[rows] = values
    return out


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


def _is_kdiffusion(den: Any) -> bool:
    """Whether the CFG denoiser ``den`` runs a k-diffusion sampler: those wrap the model in a k-diffusion denoiser
    (which has ``sigma_to_t``) and pass sigmas; A1111's timestep samplers (DDIM/PLMS/UniPC) pass timesteps."""
    return hasattr(getattr(den, "inner_model", None), "sigma_to_t")


def _noised(den: Any, z: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``z`` brought to the model input of the current step: k-diffusion samplers take ``z + sigma*noise``;
    A1111's timestep samplers (DDIM/PLMS/UniPC) pass timesteps and take ``sqrt(a)*z + sqrt(1-a)*noise``."""
    if _is_kdiffusion(den):
        return z + noise * sigma.view(-1, 1, 1, 1).to(z)
    a = _alpha(den, sigma, z)
    return a.sqrt() * z + (1 - a).sqrt() * noise


def _noise_of(den: Any, x: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noise that makes ``x`` from ``z`` at this step (the inverse of :func:`_noised`)."""
    if _is_kdiffusion(den):
        return (x - z) / sigma.view(-1, 1, 1, 1).to(x)
    a = _alpha(den, sigma, z)
    return (x - a.sqrt() * z) / (1 - a).sqrt()


def _alpha(den: Any, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    inner = getattr(den, "inner_model", None)
    model = getattr(inner, "inner_model", None) or shared.sd_model
    return model.alphas_cumprod.to(like.device)[sigma.long()].view(-1, 1, 1, 1).to(like)


def _unet_input_scale(den: Any, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
    """What the latent is multiplied by on its way into the UNet: k-diffusion's ``c_in`` (the last of its denoiser's
    scalings, eps and v models alike), 1 for the timestep samplers."""
    if _is_kdiffusion(den):
        return den.inner_model.get_scalings(sigma)[-1].view(-1, 1, 1, 1).to(like)
    return 1.0


def _x_per_denoised(den: Any, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
    """How much the model input moves per unit of the x0 prediction at a fixed noise: 1 for k-diffusion
    (``x = x0 + sigma * eps``), ``sqrt(a)`` for the timestep samplers (``x = sqrt(a) x0 + sqrt(1-a) eps``)."""
    if _is_kdiffusion(den):
        return 1.0
    return _alpha(den, sigma, like).sqrt()


def _to_denoised(den: Any, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The x0 prediction of a step's output: k-diffusion outputs are x0 already; the timestep samplers' eps
    gives ``(x - sqrt(1-a) eps) / sqrt(a)``."""
    if _is_kdiffusion(den):
        return out
    a = _alpha(den, sigma, x)
    return (x - (1 - a).sqrt() * out) / a.sqrt()


def _from_denoised(den: Any, x: torch.Tensor, sigma: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    if _is_kdiffusion(den):
        return d
    a = _alpha(den, sigma, x)
    return (x - a.sqrt() * d) / (1 - a).sqrt()


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
