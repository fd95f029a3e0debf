"""The host events a method may act on, one base class per host family.

A method's folder has ``hooks_forge.py`` (Forge 2, reForge, Forge Classic/Neo: patchers, post-CFG functions) and
``hooks_a1111.py`` (A1111: rows in the CFG batch, forward wrappers), each defining ``Hooks``, a subclass of the
family's base here; a method that acts in the CFG stage only has one ``hooks.py`` for every host
(:class:`lib_attn.cfg.CfgHooks`).  The host adapter makes one ``Hooks`` per method that is switched on, in
:data:`lib_attn.methods.ORDER`, and calls each event on all of them in that order.  A hook gets an explicit
context (:class:`ForgeContext`) and keeps its state on itself and in its method's run object; it imports nothing
from the WebUI.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lib_attn.ops import grid_of

Tensor = torch.Tensor
MODE = "attn_toolkit_mode"  # transformer_options key of a method's own model calls ("capture", "off", ...)


@dataclass
class ForgeContext:
    """What a Forge-family hook may read and use.  Filled by the host adapter; one per generation."""

    p: Any
    services: Any
    fail: Callable[[Exception], None]
    calc: Callable[..., Any]  # calc_cond_uncond_batch(model, cond, uncond, x, sigma, model_options)
    attention: Callable[..., Tensor]  # the host's attention: (q, k, v, heads, extra_options=None)
    img2img: bool = False
    plan: Any = None  # the pass's PassPlan
    step: int = 0  # the host's sampling step (it lags: the first two CFG calls both see 0)
    total_steps: int = 0
    calls: int = 0  # CFG-denoiser calls so far in this generation: tells one call's attention from the next
    call_index: int = 0  # the CFG denoiser's own call counter in this pass (0 at the pass's first model evaluation)
    unet: Any = None  # the pass's UNet module (its attention layers' projections)
    failed: Callable[[], bool] = lambda: False  # whether the generation has already failed


def make_hooks(settings: Any, family: str, ctx: Any, runs: dict) -> list[tuple[str, Any]]:
    """``(method name, Hooks)`` of every method that is switched on, in method order; ``family`` names the hook
    module (``"forge"``: ``hooks_forge.py``, ``"a1111"``: ``hooks_a1111.py``)."""
    from lib_attn.methods import METHODS

    out = []
    for m in METHODS:
        if settings.section(m.name).active:
            try:
                module = importlib.import_module(f"lib_attn.methods.{m.name}.hooks_{family}")
            except ModuleNotFoundError as e:
                if e.name != f"lib_attn.methods.{m.name}.hooks_{family}":
                    raise
                module = importlib.import_module(f"lib_attn.methods.{m.name}.hooks")  # the same on every host
            out.append((m.name, module.Hooks(ctx, runs.get(m.name))))
    return out


def with_attn1_replace(model_options: dict, patch: Any, keys: list[tuple[str, int, int]]) -> dict:
    """Copy of ``model_options`` with ``patches_replace['attn1'][key] = patch`` (copy-on-write)."""
    out = dict(model_options)
    to = dict(out.get("transformer_options", {}))
    pr = dict(to.get("patches_replace", {}))
    attn1 = dict(pr.get("attn1", {}))
    for k in keys:
        attn1[k] = patch
    pr["attn1"] = attn1
    to["patches_replace"] = pr
    out["transformer_options"] = to
    return out


def with_transformer_option(model_options: dict, key: str, value: Any) -> dict:
    out = dict(model_options)
    out["transformer_options"] = {**out.get("transformer_options", {}), key: value}
    return out


def block_key(extra_options: dict) -> tuple | None:
    """The ``(block, number, index)`` key of the attention call (Forge's patch key)."""
    block = extra_options.get("block")
    return (block[0], block[1], extra_options.get("block_index", 0)) if block is not None else None


class ForgeHooks:
    """Forge-family events; each does nothing unless a method overrides it."""

    cfg_stage = False  # the method acts in the CFG stage (lib_attn/cfg.py): the host installs its CFG function

    def __init__(self, ctx: ForgeContext, run: Any = None):
        self.ctx = ctx
        self.run = run

    def check(self, plans: tuple) -> None:
        """Before sampling, with the plans of the first and the hires pass: raise a SettingsError for what this host
        cannot do."""

    def begin_sampling(self) -> None:
        """Start of one sampling call of the host (one per batch; the hires pass runs inside it)."""

    def end_sampling(self) -> None:
        """Sampling returned with no error."""

    def after_sampling(self) -> None:
        """Sampling is over, however it ended."""

    def follow_up(self) -> contextlib.AbstractContextManager | None:
        """A context in which the host samples once more (with fresh, unpatched model objects), or None."""
        return None

    def sampler_function(self) -> Callable[..., Any] | None:
        """A function that replaces the host's k-diffusion sampling function (``p.sampler.func``) for this sampling
        call, or None.  It is called as the host calls its sampler function (``model, x, extra_args=, callback=,
        disable=``, and ``sigmas=`` where the sampler has a sigma schedule) and returns the final latent."""
        return None

    def begin_pass(self, plan: Any) -> None:
        """A new pass is planned (``plan``: this method's plan in it, None where inactive)."""

    def install(self, plan: Any) -> dict:
        """Patches for the pass: ``{"attn1": keys, "attn2": keys, "observe_attn1": keys, "unet_wrapper": fn,
        "block_input": {transformer block path: fn}}`` (all optional; ``fn(x, transformer_options) -> x`` changes a
        transformer block's input, as an object patch of its ``forward``).  The host patches each key once and calls there every method's ``observe_attn1``, then its
        ``attn1``/``attn2``; ``unet_wrapper(apply_model, args)`` wraps the model function (Forge's
        ``model_function_wrapper``; ``apply_model(x, t, **c)`` runs the next wrapper or the model)."""
        return {}

    def on_denoiser(self, params: Any) -> None:
        """The CFG denoiser is about to run the model (``params.x`` may be changed: one row per image)."""

    def skip_uncond(self) -> bool:
        """At this step the host need not run the uncond rows (their prediction is the cond one)."""
        return False

    def cfg(self, g: Any) -> None:
        """The CFG stage of this step (a :class:`lib_attn.cfg.CfgStep`): change how cond and uncond combine."""

    def post_cfg(self, args: dict, denoised: Tensor) -> Tensor:
        """After CFG: return the changed prediction."""
        return denoised

    def observe_attn1(self, key: tuple, q: Tensor, k: Tensor, extra_options: dict) -> None:
        """Every self-attention call on this method's keys, before any method replaces it."""

    def attn1(self, key: tuple, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor | None:
        """Self-attention output on this method's keys, or None to leave it to the next method (or the host)."""
        return None

    def attn2(self, key: tuple, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor | None:
        """Cross-attention output on this method's keys, or None."""
        return None


def source_latent(ctx: ForgeContext, params: Any, from_p: bool = False) -> Tensor | None:
    """The source latent of the pass (the denoiser's ``init_latent``; with ``from_p`` also ``p.init_latent``), None
    where there is none with one row per image of ``params.x``."""
    z0 = getattr(params.denoiser, "init_latent", None)
    if z0 is None and from_p:
        z0 = getattr(ctx.p, "init_latent", None)
    return z0 if isinstance(z0, torch.Tensor) and z0.shape[0] == params.x.shape[0] else None


def start_noise(params: Any, z0: Tensor) -> Tensor:
    """The noise that makes the first model input from ``z0`` (k-diffusion: ``x = z0 + sigma * noise``)."""
    x = params.x
    return (x - z0.to(x)) / params.sigma.view(-1, 1, 1, 1).to(x)


def keep_source(run: Any, params: Any) -> None:
    """The model input (one row per image) keeps ``run``'s source, noised to this level, outside its mask."""
    x, sigma = params.x, params.sigma
    noised = run.z0.to(x) + run.noise.to(x) * sigma.view(-1, 1, 1, 1).to(x)
    params.x = run.blend_input(x, list(range(x.shape[0])), noised)


def cond_chunk(ctx: ForgeContext, key: Any, q: Tensor, extra_options: dict, seen: set, field: Any) -> tuple | None:
    """For attention maps of the cond rows: ``(start, stop, (h, w))`` of this attention call's cond rows and its
    grid, once per CFG call and layer (the step's own model call, not a method's extra call) and never in a method's
    own calls (capture, guided); None otherwise.  A grid that does not fit fails ``field`` (a Field)."""
    if extra_options.get(MODE) is not None or (ctx.calls, key) in seen:
        return None
    flags = list(extra_options.get("cond_or_uncond") or [])
    if 0 not in flags or q.shape[0] % len(flags):
        return None
    seen.add((ctx.calls, key))
    chunk = q.shape[0] // len(flags)
    start = flags.index(0) * chunk
    shape = extra_options.get("original_shape")
    try:
        hw = grid_of(int(q.shape[1]), (int(shape[-2]), int(shape[-1])))
    except (TypeError, ValueError) as e:
        ctx.fail(field.error(f"cannot place the attention map: {e}"))
        return None
    return start, start + chunk, hw


@dataclass
class Step:
    """One CFG-denoiser call on A1111: the batch layout after the methods' rows were inserted, and what the host
    saw of it."""

    layout: Any  # lib_attn.batch.BatchLayout
    denoiser: Any
    blend_in: tuple | None = None  # (model input, sigma) of those rows, after the input blends
    skip_uncond: bool = False  # a method asked the host not to run the uncond rows at this step
    cfg_in: tuple | None = None  # (model input, sigma) of each image's first cond row, for the CFG stage
    cfg_pred: tuple | None = None  # (c, u) in x0 units, for the CFG stage (see lib_attn.cfg)


class A1111Hooks:
    """A1111 events; each does nothing unless a method overrides it.  ``ctx`` (built by ``host/a1111.py``) gives:
    ``p``, ``services``, ``fail(e)``, ``failed()``, ``plan``, ``step``/``total_steps`` (the sampling step),
    ``st`` (the :class:`Step` in progress, None outside one), ``call`` (``(first row, rows)`` of the UNet call in
    progress in the step's layout), ``private`` (a method's own model call is running: others pass through),
    ``latent_hw``, ``sub_call(call_next, args, kwargs, n, a, b)`` (rows a..b of a wrapped call as a call of their
    own), ``call_span(start, rows)``, ``cond_out`` (after CFG: each image's first cond row of the model output),
    ``first_cond_rows``, ``keep_source_input``, ``condition(...)``, ``like(...)``, ``denoiser`` (the step's CFG
    denoiser), ``model_call(x, sigma, text, image_cond)`` (a call of the method's own, e.g. after CFG), and the
    sampler maths ``noised``, ``noise_of``, ``to_denoised``, ``from_denoised``, ``output_delta``, ``x_per_denoised``,
    ``unet_input_scale``, ``timestep``,
    ``cfg_scale``, ``in_one_call``, ``in_batch``, ``unet(denoiser)``."""

    transforms_rows = False  # its attention wrappers change the output of the host's rows (other wrappers adapt)
    cfg_stage = False  # the method acts in the CFG stage (lib_attn/cfg.py)

    def __init__(self, ctx: Any, run: Any = None):
        self.ctx = ctx
        self.run = run

    def begin_sampling(self) -> None:
        """Start of one ``p.sample`` call (one per batch; the hires pass runs inside it)."""

    def end_sampling(self) -> None:
        """Sampling returned with no error."""

    def after_sampling(self) -> None:
        """Sampling is over, however it ended."""

    def follow_up(self) -> contextlib.AbstractContextManager | None:
        """A context in which the host samples once more (none of the hooks is installed then), or None."""
        return None

    def sampler_function(self) -> Callable[..., Any] | None:
        """A function that replaces the host's k-diffusion sampling function (``p.sampler.func``) for this sampling
        call, or None.  It is called as the host calls its sampler function (``model, x, extra_args=, callback=,
        disable=``, and ``sigmas=`` where the sampler has a sigma schedule) and returns the final latent."""
        return None

    def begin_pass(self, plan: Any, new_pass: bool) -> None:
        """A pass starts on a UNet (``new_pass`` False: the same pass goes on on another UNet, a refiner)."""

    def install(self, plan: Any, unet: Any, patches: Any) -> None:
        """Wrap what the method needs on ``unet`` for the pass (``patches.wrap_forward``); called in reverse method
        order, so the first method's wrappers are the outermost."""

    def step_active(self) -> bool:
        """Whether the method acts at this step (the host leaves a step alone where none does)."""
        return False

    def input(self, params: Any, layout: Any) -> bool:
        """Before any rows are inserted: may change ``params.x`` (the host's cond and uncond rows); True when the
        method will also blend the prediction."""
        return False

    def prepare(self, params: Any, layout: Any) -> None:
        """Before any rows are inserted, after the input blends: read what the step needs."""

    def rows(self, params: Any, layout: Any) -> tuple[list, list]:
        """``(groups, capture)``: row groups ``(name, source images, given tensors)`` to insert between the cond and
        the uncond rows, and capture groups for the host's private call(s) (or to ride along when they fit)."""
        return [], []

    def skip_uncond(self) -> bool:
        """At this step (asked once ``step_active`` said so) the host need not run the uncond rows: they are not
        computed and take each image's first cond output."""
        return False

    def denoised(self, out: Tensor) -> None:
        """The model output of the whole batch (``on_cfg_denoised``), in the step's layout."""

    def cfg(self, g: Any) -> None:
        """The CFG stage of this step (a :class:`lib_attn.cfg.CfgStep`): change how cond and uncond combine."""

    def after_cfg(self, params: Any, delta: Tensor) -> Tensor:
        """After CFG: return ``delta`` plus this method's change of the B-row prediction ``params.x``."""
        return delta

    def blend_prediction(self, denoised: Callable[[], Tensor]) -> Tensor | None:
        """The x0 prediction with the source kept where the method's mask says (``denoised()`` gives the current
        one); None: unchanged."""
        return None
