"""What the adapters of the WebUIs on Forge's patcher share (Forge 2.x and Neo on ``backend/``; reForge and Forge
Classic on ``ldm_patched``): the per-generation :class:`ForgeSession`.  Each adapter (``forge.py``, ``reforge.py``,
``classic.py``) is a :class:`Backend`: where the host's attention and batched model call live, and how the CFG stage
is put on a UNet clone.

Forge resets ``p.sd_model.forge_objects`` before every sampling pass and then calls
``process_before_every_sampling``; there the session clones ``forge_objects.unet``, puts one post-CFG function,
one model-function wrapper and one ``attn1``/``attn2`` replace patch per layer that a method asked for on the
clone, and assigns it back, so the patches live exactly as long as the pass.  Each of them calls the methods'
hooks (``lib_attn/methods/<name>/hooks_forge.py``) in method order.  This file names no method.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from modules import script_callbacks

from lib_attn.cfg import CfgStep
from lib_attn.hooks import ForgeContext, block_key, make_hooks
from lib_attn.host.services import SERVICES
from lib_attn.registry import clean_leftovers
from lib_attn.session import (
    Session,
    attach,
    check_settings_against,
    get,
    layer_keys,
    layer_widths,
    make_runs,
    plan_pass,
)
from lib_attn.settings import Settings, SettingsError

log = logging.getLogger("lib_attn")

_CLONE_MARK = "_attn_toolkit_session"


class Backend:
    """One WebUI on Forge's patcher.  The defaults are Forge 2's CFG stage (also Forge Classic's): a pre-CFG function
    that sees the conds before the model call and may drop the uncond ones, and ``sampler_cfg_function``."""

    def calc(self, model: Any, cond: Any, uncond: Any, x: Any, sigma: Any, model_options: dict) -> tuple:
        """The host's batched model call: ``(cond_pred, uncond_pred)``."""
        raise NotImplementedError

    def attention(self, q: Any, k: Any, v: Any, heads: int, extra_options: dict | None = None) -> Any:
        """The host's attention on projected ``(B, N, heads * dim_head)`` tensors."""
        raise NotImplementedError

    def install(self, clone: Any, session: ForgeSession, cfg: bool) -> None:
        """What the session needs on ``clone`` besides the patches: the CFG stage, when a method has one (``cfg``)."""
        if not cfg:
            return

        def pre_cfg(model: Any, cond: Any, uncond: Any, x: Any, timestep: Any, model_options: dict) -> tuple:
            if session.begin_step(cond, uncond is not None):
                uncond = None
            return model, cond, uncond, x, timestep, model_options

        clone.add_sampler_pre_cfg_function(pre_cfg)
        clone.set_model_sampler_cfg_function(session.cfg_function)

    def post_cfg_args(self, args: dict, session: ForgeSession) -> dict:
        """The post-CFG arguments as Forge 2 gives them."""
        return args


class ForgeSession(Session):
    def __init__(self, p: Any, settings: Settings, backend: Backend):
        super().__init__(settings)
        self.p = p
        self.backend = backend
        self.runs = make_runs(p, settings, SERVICES)
        self.ctx = ForgeContext(
            p,
            SERVICES,
            self.fail,
            backend.calc,
            backend.attention,
            img2img=bool(getattr(p, "init_images", None)),
            failed=lambda: self.error is not None,
        )
        self.named_hooks = make_hooks(settings, "forge", self.ctx, self.runs)
        self._inpainting = False  # a follow-up pass runs unpatched
        self._attn: dict[str, dict[tuple, list]] = {"attn1": {}, "attn2": {}}  # key -> hooks patching it
        self._observers: dict[tuple, list] = {}
        self._wrappers: list = []
        self._block_inputs: dict = {}  # transformer block -> functions changing its input
        self._inner_wrapper: Any = None  # another extension's model-function wrapper
        self._strength = 1.0  # the step's sum of AND weights (Forge multiplies c - u by it)
        self._skipped = False  # the CFG stage skipped the step's uncond pass
        self.step_uncond: Any = None  # the step's negative conds as the CFG denoiser had them (a backend may note them)
        self._watch_post_cfg = False  # this pass's clone has the post-CFG function: count that it runs
        self._model_calls = 0  # CFG-denoiser calls in this pass, and post-CFG calls (a sampler may drop ours)
        self._post_cfg_calls = 0

    @contextlib.contextmanager
    def sampling(self):
        unet = _diffusion_model(self.p)
        if unet is None:
            raise _unsupported_error(self.p)
        clean_leftovers(unet)
        plans = check_settings_against(unet, self.settings, img2img=self.ctx.img2img)
        for h in self.hooks:
            h.check(plans)
        on_cfg_denoiser = self.guarded(self.on_cfg_denoiser)
        try:
            with self.running_hooks():
                script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
                try:
                    yield self
                finally:
                    script_callbacks.remove_callbacks_for_function(on_cfg_denoiser)
        finally:
            self.end_pass()

    @contextlib.contextmanager
    def follow_up(self):
        """A method that asks for it (a final pass of its own): the host samples once more with fresh,
        unpatched ``forge_objects`` (as Forge sets them before a pass)."""
        scope = self.follow_up_scope()
        if scope is None:
            yield False
            return
        sd_model = self.p.sd_model
        fresh = getattr(sd_model, "forge_objects_after_applying_lora", None)
        if fresh is not None:
            sd_model.forge_objects = fresh.shallow_copy()
        self._inpainting, self._watch_post_cfg = True, False
        try:
            with scope:
                yield True
        finally:
            self._inpainting = False

    def on_cfg_denoiser(self, params: Any) -> None:
        self.ctx.step, self.ctx.total_steps = params.sampling_step, params.total_sampling_steps
        self.ctx.call_index = int(getattr(params.denoiser, "step", 0))
        self.ctx.calls += 1
        if self.plan is None:
            return
        if self._watch_post_cfg and self._model_calls and not self._post_cfg_calls:
            self._watch_post_cfg = False
            sampler = getattr(self.p, "hr_sampler_name", None) if getattr(self.p, "is_hr_pass", False) else None
            sampler = None if sampler in ("", "Use same sampler") else sampler
            self.fail(
                SettingsError(
                    "sampler_name",
                    "Sampler",
                    f"{sampler or getattr(self.p, 'sampler_name', '?')} drops the post-CFG functions the methods "
                    "need (the CFG++ samplers of reForge do); choose another sampler",
                )
            )
        self._model_calls += 1
        for h in self.hooks:
            h.on_denoiser(params)

    def patch_unet(self, p: Any) -> None:
        """Called from ``process_before_every_sampling``: patch a clone of ``forge_objects.unet``."""
        fo = p.sd_model.forge_objects
        if self._inpainting or getattr(fo.unet, _CLONE_MARK, None) is self:
            return  # already patched for this pass (Forge calls the hook twice in the hires pass)
        self.patches.remove()
        self._watch_post_cfg = False
        unet_module = getattr(fo.unet.model, "diffusion_model", None)
        if unet_module is None:
            self.fail(_unsupported_error(p))
            return
        is_hr = bool(getattr(p, "is_hr_pass", False))
        keys = layer_keys(unet_module)
        try:
            self.plan = plan_pass(self.settings, is_hr, keys, layer_widths(unet_module, keys), img2img=self.ctx.img2img)
        except SettingsError as e:
            self.fail(e)
            return
        self.ctx.plan, self.ctx.unet = self.plan, unet_module
        for name, h in self.named_hooks:
            h.begin_pass(self.plan.of(name))
        if not self.plan.any:
            return
        clone = fo.unet.clone()
        setattr(clone, _CLONE_MARK, self)
        cfg_hooks = [h for name, h in self.named_hooks if h.cfg_stage and self.plan.of(name) is not None]
        if cfg_hooks and "sampler_cfg_function" in clone.model_options:
            self.fail(
                cfg_hooks[0].enabled_field.error(
                    "another extension already sets Forge's CFG function (sampler_cfg_function); switch it off "
                    "or leave this method off"
                )
            )
            return
        self.backend.install(clone, self, bool(cfg_hooks))
        clone.set_model_sampler_post_cfg_function(self._post_cfg)
        self._watch_post_cfg, self._model_calls, self._post_cfg_calls = True, 0, 0
        self._attn, self._observers, self._wrappers = {"attn1": {}, "attn2": {}}, {}, []
        block_inputs: dict[str, list] = {}
        for name, h in self.named_hooks:
            wants = h.install(self.plan.of(name))
            for kind in ("attn1", "attn2"):
                for key in wants.get(kind, ()):
                    self._attn[kind].setdefault(key, []).append(h)
            for key in wants.get("observe_attn1", ()):
                self._observers.setdefault(key, []).append(h)
                self._attn["attn1"].setdefault(key, [])
            if wants.get("unet_wrapper") is not None:
                self._wrappers.append(wants["unet_wrapper"])
            for path, fn in wants.get("block_input", {}).items():
                block_inputs.setdefault(path, []).append(fn)
        # block inputs: the blocks' forwards are swapped only while the model runs, inside the model-function
        # wrapper (Forge Neo's object patches cannot hold a function); another extension's wrapper runs innermost
        self._block_inputs = {unet_module.get_submodule(path): fns for path, fns in block_inputs.items()}
        if self._wrappers or self._block_inputs:
            self._inner_wrapper = clone.model_options.get("model_function_wrapper")
            clone.set_model_unet_function_wrapper(self._unet_wrapper)
        for key in self._attn["attn1"]:
            clone.set_model_patch_replace(self._attn1_patch, "attn1", key[0], key[1], key[2])
        for key in self._attn["attn2"]:
            clone.set_model_patch_replace(self._attn2_patch, "attn2", key[0], key[1], key[2])
        fo.unet = clone

    def _post_cfg(self, args: dict) -> Any:
        self._post_cfg_calls += 1
        denoised = args["denoised"]
        if self.plan is None:
            return denoised
        args = self.backend.post_cfg_args(args, self)
        for h in self.hooks:
            denoised = h.post_cfg(args, denoised)
        return denoised

    def begin_step(self, cond: list, has_uncond: bool) -> bool:
        """Before the model call: note the AND weights; whether to drop the uncond pass (a method skips it)."""
        self._strength = float(sum(c.get("strength", 1.0) for c in cond))
        self._skipped = has_uncond and self.plan is not None and any(h.skip_uncond() for h in self.hooks)
        return self._skipped

    def cfg_function(self, args: dict) -> Any:
        """Forge's ``sampler_cfg_function`` (its result is used as ``x - result``): the CFG stage."""
        x, w, k = args["input"], float(args["cond_scale"]), self._strength
        c, u = args["cond_denoised"], args["uncond_denoised"]
        if self._skipped:
            return x - c
        if w == 1.0 or self.plan is None:
            return x - (u + (c - u) * (w * k))  # what Forge computes without a CFG function
        ctx = self.ctx
        g = CfgStep(x, u + (c - u) * k, u, w, ctx.call_index, ctx.step, ctx.total_steps)
        for h in self.hooks:
            if h.cfg_stage:
                h.cfg(g)
        return x - g.result()

    def _unet_wrapper(self, apply_model: Any, args: dict) -> Any:
        """``model_function_wrapper``: the methods' wrappers, the first outermost."""

        def run(i: int, args: dict) -> Any:
            if i == len(self._wrappers):
                with _block_forwards(self._block_inputs):
                    if self._inner_wrapper is not None:
                        return self._inner_wrapper(apply_model, args)
                    return apply_model(args["input"], args["timestep"], **args["c"])
            return self._wrappers[i](lambda x, t, **c: run(i + 1, {**args, "input": x, "timestep": t, "c": c}), args)

        return run(0, args)

    def _attn1_patch(self, q: Any, k: Any, v: Any, extra_options: dict) -> Any:
        key = block_key(extra_options)
        for h in self._observers.get(key, ()):
            h.observe_attn1(key, q, k, extra_options)
        return self._replace("attn1", key, q, k, v, extra_options)

    def _attn2_patch(self, q: Any, k: Any, v: Any, extra_options: dict) -> Any:
        return self._replace("attn2", block_key(extra_options), q, k, v, extra_options)

    def _replace(self, kind: str, key: Any, q: Any, k: Any, v: Any, extra_options: dict) -> Any:
        """The first method's output for this attention call, else the host's attention."""
        for h in self._attn[kind].get(key, ()):
            out = getattr(h, kind)(key, q, k, v, extra_options)
            if out is not None:
                return out
        return self.backend.attention(q, k, v, int(extra_options["n_heads"]), extra_options)


@contextlib.contextmanager
def _block_forwards(block_inputs: dict):
    """Each block's ``forward`` replaced on the instance for one model call, always put back."""
    try:
        for block, fns in block_inputs.items():
            block.forward = _block_input_forward(block, fns)
        yield
    finally:
        for block in block_inputs:
            block.__dict__.pop("forward", None)


def _block_input_forward(block: Any, fns: list) -> Any:
    """A transformer block's ``forward`` for one model call (see ``_block_forwards``): ``fn(x, transformer_options)``
    of each method changes the block's input first."""
    forward = type(block).forward

    def patched(x: Any, context: Any = None, transformer_options: Any = None, **kw: Any) -> Any:
        options = {} if transformer_options is None else transformer_options
        for fn in fns:
            x = fn(x, options)
        return forward(block, x, context=context, transformer_options=options, **kw)

    return patched


def _diffusion_model(p: Any) -> Any:
    fo = getattr(p.sd_model, "forge_objects", None)
    unet = getattr(fo, "unet", None)
    return getattr(getattr(unet, "model", None), "diffusion_model", None)


def _unsupported_error(p: Any) -> SettingsError:
    name = type(getattr(p, "sd_model", None)).__name__
    return SettingsError(
        "model", "Model", f"the loaded model ({name}) has no UNet; the toolkit supports SD1.x, SD2.x and SDXL"
    )


# ---- entry points used by the Script ----------------------------------------------------------
def begin(p: Any, settings: Settings, backend: Backend) -> None:
    attach(p, ForgeSession(p, settings, backend))


def before_every_sampling(p: Any) -> None:
    session = get(p)
    if isinstance(session, ForgeSession):
        session.patch_unet(p)


def cleanup_model() -> int:
    return 0  # Forge patches live on clones that the host discards
