"""Per-generation state shared by the host adapters.

A :class:`Session` lives on the processing object ``p`` for one generation (never in a module
global).  It holds the parsed settings, the plan of the current sampling pass, the patches of
that pass, the current step, and the first error met during sampling (raised once sampling is
over, so a bad setting fails the generation loudly instead of being logged and dropped).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from lib_attn.layers import LayerKey, keys_from_module_names
from lib_attn.methods import METHODS
from lib_attn.methods.base import PlanContext
from lib_attn.registry import PatchSet
from lib_attn.settings import TITLE, Settings, SettingsError

log = logging.getLogger("lib_attn")

SESSION_ATTR = "_attn_toolkit_session"


class PassPlan:
    """What runs in one sampling pass (first pass or hires pass) on one UNet: each method's plan, None where the
    method is inactive in that pass (``plan.pag``, ``plan.of("pag")``)."""

    __slots__ = ("is_hr_pass", "plans")

    def __init__(self, is_hr_pass: bool, plans: dict[str, Any]):
        self.is_hr_pass = is_hr_pass
        self.plans = plans

    def __getattr__(self, name: str) -> Any:
        try:
            return self.plans[name]
        except KeyError:
            raise AttributeError(name) from None

    def of(self, name: str) -> Any:
        return self.plans.get(name)

    @property
    def any(self) -> bool:
        return any(p is not None for p in self.plans.values())


def layer_keys(unet: nn.Module) -> list[LayerKey]:
    return keys_from_module_names(name for name, _ in unet.named_modules())


def layer_widths(unet: nn.Module, keys: Iterable[LayerKey]) -> dict[LayerKey, int]:
    """Channel width of each attention layer (the input width of its ``to_q``; 0 when unknown)."""
    out = {}
    for k in keys:
        to_q = getattr(unet.get_submodule(k.module_path), "to_q", None)
        out[k] = int(getattr(to_q, "in_features", 0) or 0)
    return out


def plan_pass(
    settings: Settings,
    is_hr_pass: bool,
    available: Iterable[LayerKey],
    widths: dict[LayerKey, int] | None = None,
    img2img: bool = False,
) -> PassPlan:
    """Each method's plan for a pass; a bad layer selector raises a SettingsError naming the field.  ``img2img``:
    the generation is an img2img one."""
    available = tuple(available)
    ctx = PlanContext(is_hr_pass, available, widths or {}, img2img)
    return PassPlan(is_hr_pass, {m.name: m.plan(settings.section(m.name), ctx) for m in METHODS})


def make_runs(p: Any, settings: Settings, services: Any) -> dict[str, Any]:
    """The per-generation run object of each method that is switched on and keeps state (in method order; a bad
    input raises the field's SettingsError)."""
    runs = {}
    for m in METHODS:
        if m.run is not None and settings.section(m.name).enabled:
            runs[m.name] = m.run(p, settings, services)
    return runs


class Session:
    """State of one generation; subclassed per host."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.error: Exception | None = None
        self.plan: PassPlan | None = None
        self.pass_key: tuple | None = None
        self.patches = PatchSet()
        self.runs: dict[str, Any] = {}  # method name -> its run object (see make_runs)
        self.named_hooks: list[tuple[str, Any]] = []  # (method name, its host hooks), in method order

    @property
    def hooks(self) -> list:
        return [h for _, h in self.named_hooks]

    @contextlib.contextmanager
    def running_hooks(self):
        """One host sampling call for the hooks: ``begin_sampling``; ``end_sampling`` when it returned with no error;
        ``after_sampling`` however it ended."""
        for h in self.hooks:
            h.begin_sampling()
        try:
            with self._sampler_replaced():
                yield
            for h in self.hooks:
                if self.error is None:
                    h.end_sampling()
        finally:
            for h in self.hooks:
                h.after_sampling()

    @contextlib.contextmanager
    def _sampler_replaced(self):
        """The first hook's sampling function (``sampler_function``) in place of the processing's sampler function
        (``p.sampler.func``, which every host's sampler calls) for this sampling call; put back however it ends."""
        fn = next((f for f in (h.sampler_function() for h in self.hooks) if f is not None), None)
        if fn is None:
            yield
            return
        sampler = getattr(getattr(self, "p", None), "sampler", None)
        if sampler is None or not callable(getattr(sampler, "func", None)):
            raise RuntimeError(f"{TITLE}: the WebUI's sampler has no sampling function to replace")
        had = "func" in vars(sampler)
        original = sampler.func
        sampler.func = fn
        try:
            yield
        finally:
            if had:
                sampler.func = original
            else:
                del sampler.func

    def follow_up_scope(self) -> Any:
        """The first hook's scope for one more host sampling call, or None (and None after a failure)."""
        if self.error is not None:
            return None
        return next((s for s in (h.follow_up() for h in self.hooks) if s is not None), None)

    def fail(self, error: Exception) -> None:
        """Remember the first error; it is raised when sampling returns."""
        if self.error is None:
            self.error = error
        log.error("[Attention Toolkit] %s", error)

    def guarded(self, callback: Callable) -> Callable:
        """``callback`` as a host callback: an exception fails the generation with its cause (raised once sampling
        returns) instead of being logged and dropped by the host's callback runner while sampling goes on."""

        @functools.wraps(callback)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except Exception as e:
                self.fail(e)
                return None

        return call

    def end_pass(self) -> None:
        self.patches.remove()
        self.plan = None
        self.pass_key = None

    @contextlib.contextmanager
    def follow_up(self):
        """Yields whether the host should sample once more, with what the session set up for it."""
        yield False

    def raise_pending(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err


def check_settings_against(unet: nn.Module, settings: Settings, img2img: bool = False) -> tuple[PassPlan, PassPlan]:
    """Validate model-dependent settings (layer selectors) for both passes before sampling starts; returns the
    plans of the first pass and the hires pass (for a host's own checks)."""
    available = layer_keys(unet)
    if not available:
        raise SettingsError("model", "Model", "this model has no UNet attention layers the toolkit can hook")
    first = plan_pass(settings, False, available, layer_widths(unet, available), img2img=img2img)
    return first, plan_pass(settings, True, available, img2img=img2img)


_SAMPLE_ATTR = "sample"
_ORIGINAL = "__attn_toolkit_original__"


def attach(p: object, session: Session) -> None:
    """Put ``session`` on ``p`` and wrap ``p.sample`` (an instance attribute) so that every sampling
    call runs inside ``session.sampling()`` and a pending error is raised once sampling returns."""
    end(p)
    setattr(p, SESSION_ATTR, session)
    original = p.sample

    def sample(*args, **kwargs):
        with session.sampling():
            result = original(*args, **kwargs)
        session.raise_pending()
        with session.follow_up() as again:  # a second host sampling call some methods ask for (edit mask inpaint)
            if again:
                result = original(*args, **kwargs)
        return result

    setattr(sample, _ORIGINAL, original)
    setattr(p, _SAMPLE_ATTR, sample)


def get(p: object) -> Session | None:
    return p.__dict__.get(SESSION_ATTR)


def end(p: object) -> None:
    """Detach the session and unwrap ``p.sample`` (postprocess; idempotent)."""
    session = p.__dict__.pop(SESSION_ATTR, None)
    wrapped = p.__dict__.get(_SAMPLE_ATTR)
    if wrapped is not None and hasattr(wrapped, _ORIGINAL):
        del p.__dict__[_SAMPLE_ATTR]
    if session is not None:
        session.end_pass()


class FailedSession(Session):
    """Stands in when the settings did not parse: the generation fails with the message."""

    def __init__(self, error: Exception):
        super().__init__(Settings())
        self.error = error

    @contextlib.contextmanager
    def sampling(self):
        self.raise_pending()
        yield self
