"""AUTOMATIC1111 (1.9+) adapter.

Lifetime: ``begin(p, settings)`` (from ``Script.process``) puts an :class:`A1111Session` on ``p`` and wraps
``p.sample`` on that instance.  Each call of ``p.sample`` (one per batch; the hires pass runs inside it) runs inside
a ``with`` that registers the CFG callbacks and removes them, and every wrapper, however sampling ends.

Passes: at the first CFG-denoiser call of a pass (first pass, hires pass, or after a model swap by the refiner or
the hires checkpoint), the wrappers of the previous pass are removed and the methods install theirs on the current
UNet (``lib_attn/methods/<name>/hooks_a1111.py``, in reverse method order: the first method's are outermost).

Steps: ``on_cfg_denoiser`` lets the methods blend the model input, then inserts their row groups between the cond
and the uncond rows (so they ride in the same model call when ``batch_cond_uncond`` is on) and runs their private
capture calls; a forward pre-hook on the UNet counts rows call by call (``ctx.call``), so wrappers act on exactly
their rows; ``on_cfg_denoised`` hands the output over; ``on_cfg_after_cfg`` adds the methods' changes and their
prediction blends.  This file names no method.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from modules import script_callbacks, shared
from torch import nn

from lib_attn import batch as batchmod
from lib_attn.batch import BatchLayout
from lib_attn.cfg import CfgStep, plain_cfg
from lib_attn.hooks import Step, make_hooks
from lib_attn.host.a1111_context import A1111Context, _cat_conds, _condition, _like, _rows, current_unet, unet_of
from lib_attn.host.services import SERVICES
from lib_attn.registry import clean_leftovers
from lib_attn.session import Session, attach, check_settings_against, layer_keys, layer_widths, make_runs, plan_pass
from lib_attn.settings import Settings, SettingsError

log = logging.getLogger("lib_attn")


class A1111Session(Session):
    def __init__(self, p: Any, settings: Settings):
        super().__init__(settings)
        self.p = p
        self.runs = make_runs(p, settings, SERVICES)
        self.ctx = A1111Context(self)
        self.named_hooks = make_hooks(settings, "a1111", self.ctx, self.runs)
        self._cursor = 0
        self._img2img = bool(getattr(p, "init_images", None))
        self._pass_is_hr: bool | None = None  # is_hr_pass of the pass in progress (a refiner swap stays in it)

    # ---- lifetime -------------------------------------------------------------------------
    @contextlib.contextmanager
    def sampling(self):
        """Scope of one ``p.sample`` call: callbacks registered, wrappers always removed."""
        unet = current_unet()
        if unet is not None:
            clean_leftovers(unet)
            check_settings_against(unet, self.settings, img2img=self._img2img)
        callbacks = (
            (script_callbacks.on_cfg_denoiser, self.guarded(self.on_cfg_denoiser)),
            (script_callbacks.on_cfg_denoised, self.guarded(self.on_cfg_denoised)),
            (script_callbacks.on_cfg_after_cfg, self.guarded(self.on_cfg_after_cfg)),
        )
        try:
            with self.running_hooks():
                try:
                    for register, fn in callbacks:
                        register(fn)
                    yield self
                finally:
                    for _, fn in callbacks:
                        script_callbacks.remove_callbacks_for_function(fn)
        finally:
            self._pass_is_hr = None
            self.end_pass()
            self.ctx.st = self.ctx.cond_out = None

    @contextlib.contextmanager
    def follow_up(self):
        """A method that asks for it (a final pass of its own): the host samples once more; none of the hooks is
        installed then (they live inside ``sampling``)."""
        scope = self.follow_up_scope()
        if scope is None:
            yield False
            return
        with scope:
            yield True

    def end_pass(self) -> None:
        super().end_pass()
        self.ctx.call = None

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
        self.ctx.plan = self.plan
        new_pass = self._pass_is_hr != is_hr
        self._pass_is_hr = is_hr
        for name, h in self.named_hooks:
            h.begin_pass(self.plan.of(name), new_pass)
        for name, h in reversed(self.named_hooks):
            h.install(self.plan.of(name), unet, self.patches)
        if self.plan.any:
            if any(h.cfg_stage and self.plan.of(name) is not None for name, h in self.named_hooks):
                self.patches.wrap_forward(unet, self._skip_uncond_rows)
            self.patches.add_handle(unet.register_forward_pre_hook(self._pre_forward, with_kwargs=True))

    # ---- CFG callbacks ----------------------------------------------------------------------
    def on_cfg_denoiser(self, params: Any) -> None:
        ctx = self.ctx
        ctx.st = ctx.cond_out = None
        den = params.denoiser
        self._ensure_pass(den)
        ctx.step, ctx.total_steps = params.sampling_step, params.total_sampling_steps
        ctx.call_index = int(getattr(den, "step", 0))
        ctx.denoiser, ctx.sigma = den, params.sigma
        if self.plan is None or not self.plan.any:
            return
        active = [h.step_active() for h in self.hooks]
        if not any(active):
            return
        ctx.uncond_rows_transformed = any(a and h.transforms_rows for a, h in zip(active, self.hooks, strict=True))
        try:
            layout = self._layout(params, den)
        except SettingsError as e:
            self.fail(e)
            return
        first = list(layout.first_cond)
        blends = [h.input(params, layout) for h in self.hooks]
        cfg = any(a and h.cfg_stage for a, h in zip(active, self.hooks, strict=True))
        first_in = None  # each image's first cond row (input and sigma) after the input blends
        if any(blends) or cfg:
            first_in = params.x[first].detach().clone(), params.sigma[first].detach().clone()
        for h in self.hooks:
            h.prepare(params, layout)
        groups, capture = [], []
        for h in self.hooks:
            g, c = h.rows(params, layout)
            groups += g
            capture += [(h, c_) for c_ in c]
        skip = any(a and h.skip_uncond() for a, h in zip(active, self.hooks, strict=True))
        if groups:
            layout = self._insert_rows(params, layout, groups)
        blend_in, cfg_in = (first_in if any(blends) else None), (first_in if cfg else None)
        ctx.st = Step(layout, den, blend_in=blend_in, skip_uncond=skip, cfg_in=cfg_in)
        self._cursor = 0
        if capture:
            self._run_private(capture)

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
        layout = layout.with_groups(
            [(name, src) for name, src, _ in groups], own_text=[name for name, _, given in groups if "text" in given]
        )
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
        st = self.ctx.st
        if st is None:
            return
        layout, out = st.layout, params.x
        first = list(layout.first_cond)
        if st.skip_uncond:
            out[list(layout.uncond)] = out[first]  # as A1111 fills the uncond rows it skips (in place: CFG reads it)
        if st.cfg_in is not None:
            st.cfg_pred = self._cfg_predictions(st, out)
        self.ctx.cond_out = out[first].clone()
        for h in self.hooks:
            h.denoised(out)

    def on_cfg_after_cfg(self, params: Any) -> None:
        ctx = self.ctx
        st, ctx.st = ctx.st, None
        ctx.call = None
        if st is None or ctx.cond_out is None:
            return
        try:
            delta = torch.zeros_like(ctx.cond_out)
            if st.cfg_pred is not None:
                delta = self._cfg_stage(st)
            for h in self.hooks:
                delta = h.after_cfg(params, delta)
            den = st.denoiser
            nmask = getattr(den, "nmask", None)
            if (
                getattr(den, "mask", None) is not None
                and nmask is not None
                and not getattr(den, "mask_before_denoising", False)
            ):
                delta = delta * nmask  # keep the host's img2img mask blend: no change where the original is kept
            out = params.x + delta.to(params.x.dtype)
            if st.blend_in is not None and self.error is None:
                out = self._blend_prediction(st, den, out)
            params.x = out
        finally:
            ctx.cond_out = None

    # ---- the CFG stage (lib_attn/cfg.py) --------------------------------------------------------
    def _cfg_predictions(self, st: Step, out: torch.Tensor) -> tuple:
        """Each image's ``c`` (its AND sub-prompts folded in) and ``u``, in x0 units."""
        layout, (x, sigma), den = st.layout, st.cfg_in, st.denoiser
        uncond = out[list(layout.uncond)]
        c = uncond.clone()
        for row in range(layout.n_cond):
            i = layout.cond_image[row]
            c[i] += (out[row] - uncond[i]) * layout.weight(row)
        to_x0 = self.ctx.to_denoised
        return to_x0(den, x, sigma, c), to_x0(den, x, sigma, uncond)

    def _cfg_stage(self, st: Step) -> torch.Tensor:
        """The CFG stage's change of the B-row prediction, in the sampler's output units."""
        ctx, den, (x, sigma), (c, u) = self.ctx, st.denoiser, st.cfg_in, st.cfg_pred
        w = ctx.cfg_scale()
        cfg_hooks = [h for h in self.hooks if h.cfg_stage]
        if w is None:
            ctx.fail(
                cfg_hooks[0].enabled_field.error(
                    "cannot run with A1111's 'skip early CFG' or negative guidance minimum sigma (NGMS) on: they skip "
                    "the uncond pass behind its back; set them to 0"
                )
            )
            return torch.zeros_like(c)
        scale = ctx.x_per_denoised(den, sigma, x)
        g = CfgStep(x / scale, c, None if st.skip_uncond else u, w, ctx.call_index, ctx.step, ctx.total_steps)
        for h in cfg_hooks:
            h.cfg(g)
        return ctx.output_delta(den, sigma, g.result() - plain_cfg(c, u, w))

    def _skip_uncond_rows(self, module: nn.Module, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        """UNet forward: where a method skips the uncond pass, the uncond rows of the call are not computed (zeros;
        ``on_cfg_denoised`` gives them the cond output)."""
        ctx, st = self.ctx, self.ctx.st
        if st is None or not st.skip_uncond or ctx.private or ctx.call is None:
            return call_next(*args, **kwargs)
        start, n = ctx.call
        keep = max(0, min(st.layout.uncond.start - start, n))
        if keep == n:
            return call_next(*args, **kwargs)
        x = args[0] if args else kwargs["x"]
        shape = (n - keep, int(getattr(module, "out_channels", x.shape[1])), *x.shape[2:])
        zeros = x.new_zeros(shape)
        if keep == 0:
            return zeros
        return torch.cat([ctx.sub_call(call_next, args, kwargs, n, 0, keep), zeros])

    def _blend_prediction(self, st: Step, den: Any, out: torch.Tensor) -> torch.Tensor:
        """The methods' source-keeping blends of the prediction, in x0 space (their masks multiply)."""
        x, sigma = st.blend_in
        d = None
        for h in self.hooks:
            got = h.blend_prediction(lambda d=d: d if d is not None else self.ctx.to_denoised(den, x, sigma, out))
            if got is not None:
                d = got
        return out if d is None else self.ctx.from_denoised(den, x, sigma, d).to(out.dtype)

    def _run_private(self, capture: list) -> None:
        """Model calls of their own for the capture rows that do not ride in the step's call, one per latent size."""
        sizes = dict.fromkeys(tuple(g[2]["x"].shape[-2:]) for _, g in capture)
        for size in sizes:
            part = [(h, g) for h, g in capture if tuple(g[2]["x"].shape[-2:]) == size]
            self._private_call(part)

    def _private_call(self, capture: list) -> None:
        groups = [g for _, g in capture]
        layout = BatchLayout(0, 0, (), (), tuple((name, tuple(src)) for name, src, _ in groups))
        x = torch.cat([g["x"] for _, _, g in groups])
        sigma = torch.cat([g["sigma"] for _, _, g in groups])
        text = _cat_conds([g["text"] for _, _, g in groups])
        ics = [g.get("image_cond") for _, _, g in groups]
        try:
            self.model_call(x, sigma, text, torch.cat(ics) if all(i is not None for i in ics) else None, layout)
        except BaseException as e:
            # the host reports and swallows errors raised in CFG callbacks: keep the real cause, so the generation
            # fails with it, and run this step without what the call was for
            self.fail(e if isinstance(e, Exception) else RuntimeError(f"Attention Toolkit: capture call ended: {e!r}"))
            for h in dict.fromkeys(h for h, _ in capture):
                h.capture_failed()
            if not isinstance(e, Exception):
                raise

    def model_call(
        self, x: torch.Tensor, sigma: torch.Tensor, text: Any, image_cond: Any = None, layout: BatchLayout | None = None
    ) -> torch.Tensor:
        """A method's own call of the step's model (``ctx.private`` is set: the methods' wrappers pass through unless
        ``layout`` names their rows); returns the model's output (x0, or eps for the timestep samplers)."""
        layout = layout or BatchLayout(0, 0, (), (), (("private", tuple(range(_rows(x)))),))
        saved = self._cursor
        self.ctx.private_layout, self._cursor = layout, 0
        try:
            return self.ctx.denoiser.inner_model(x, sigma, cond=_condition(text, image_cond, text, x))
        finally:
            self.ctx.private_layout, self._cursor, self.ctx.call = None, saved, None

    # ---- helpers ----------------------------------------------------------------------------
    def _layout(self, params: Any, den: Any) -> BatchLayout:
        uncond = params.text_uncond
        n_total = _rows(params.x)
        n_images = _rows(uncond) if uncond is not None else 0
        p = getattr(den, "p", None) or self.p
        model = getattr(p, "sd_model", None) or shared.sd_model
        if getattr(model, "cond_stage_key", None) == "edit" and n_total != 2 * n_images:
            raise SettingsError("model", "Model", "InstructPix2Pix (edit) models are not supported")
        n_cond = n_total - n_images
        if n_images <= 0 or n_cond < n_images:
            raise SettingsError("model", "Model", f"unexpected CFG batch ({n_total} rows, {n_images} uncond)")
        conds = getattr(p, "hr_c", None) if getattr(p, "is_hr_pass", False) else getattr(p, "c", None)
        batch = list(getattr(conds, "batch", None) or [])
        repeats = [len(b) for b in batch]
        weights = [float(getattr(c, "weight", 1.0)) for b in batch for c in b]
        if n_cond == n_images and repeats != [1] * n_images:
            return BatchLayout.from_repeats([1] * n_images)
        if len(repeats) != n_images or sum(repeats) != n_cond:
            raise SettingsError("model", "Model", "could not tell which rows belong to which image (AND prompts)")
        return BatchLayout.from_repeats(repeats, weights)

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ctx = self.ctx
        if ctx.st is None and ctx.private_layout is None:
            ctx.call = None
            return
        x = args[0] if args else kwargs.get("x")
        n = _rows(x)
        ctx.latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
        ctx.call = (self._cursor, n)
        self._cursor += n


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
