"""Per-instance patches on torch modules that are always removed.

:class:`PatchSet` shadows ``module.forward`` on *instances* (never on the class, which the
WebUI's ``sd_hijack`` reassigns) and keeps torch hook handles.  ``remove()`` restores LIFO and is
idempotent.  Every wrapper also carries an ``active`` flag: once removed it only delegates, so
even a wrapper that another extension chained over keeps no effect after the generation.

:func:`clean_leftovers` removes any wrapper of ours still found on a model (a defensive sweep at
the start of a run and when scripts are reloaded).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

log = logging.getLogger("lib_attn")

MARK = "_attn_toolkit_patch"
_MISSING = object()

# wrapper(module, call_next, *args, **kwargs) -> output; ``call_next`` runs what would have run without us.
WrapFn = Callable[..., Any]


class _Wrapper:
    """Callable installed as ``module.forward``; delegates once deactivated."""

    def __init__(self, module: nn.Module, fn: WrapFn, previous: Any):
        self.module = module
        self.fn = fn
        self.previous = previous
        self.active = True
        setattr(self, MARK, True)

    def call_next(self, *args: Any, **kwargs: Any) -> Any:
        if self.previous is not _MISSING:
            return self.previous(*args, **kwargs)
        # Look the class method up at call time so an optimizer switch in between is respected.
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return self.call_next(*args, **kwargs)
        return self.fn(self.module, self.call_next, *args, **kwargs)


class PatchSet:
    """Patches installed for one pass or generation.  Use as a context manager."""

    def __init__(self) -> None:
        self._wrappers: list[_Wrapper] = []
        self._handles: list[Any] = []

    def __len__(self) -> int:
        return len(self._wrappers) + len(self._handles)

    def wrap_forward(self, module: nn.Module, fn: WrapFn) -> None:
        current = module.__dict__.get("forward", _MISSING)
        if getattr(current, MARK, False) and current.active and current not in self._wrappers:
            raise RuntimeError(f"{type(module).__name__} already carries an Attention Toolkit patch")
        w = _Wrapper(module, fn, current)
        module.forward = w
        self._wrappers.append(w)

    def wrappers_of(self, module: nn.Module) -> list[_Wrapper]:
        """Our wrappers on ``module`` now, outermost first."""
        out, fwd = [], module.__dict__.get("forward")
        while getattr(fwd, MARK, False):
            out.append(fwd)
            fwd = fwd.previous
        return out

    def add_handle(self, handle: Any) -> None:
        """Keep a torch ``RemovableHandle`` (forward hook / pre-hook) for removal."""
        self._handles.append(handle)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._wrappers:
            w = self._wrappers.pop()
            w.active = False
            if w.module.__dict__.get("forward") is w:
                if w.previous is _MISSING:
                    del w.module.forward
                else:
                    w.module.forward = w.previous
            else:
                log.warning(
                    "[Attention Toolkit] another extension wrapped %s over our patch; ours is now inert",
                    type(w.module).__name__,
                )

    def __enter__(self) -> PatchSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def is_patched(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    return bool(getattr(fwd, MARK, False))


def clean_leftovers(root: nn.Module) -> int:
    """Remove every wrapper of ours found under ``root``; returns how many were removed."""
    n = 0
    for m in root.modules():
        fwd = m.__dict__.get("forward")
        while getattr(fwd, MARK, False):
            fwd.active = False
            if fwd.previous is _MISSING:
                del m.forward
            else:
                m.forward = fwd.previous
            n += 1
            fwd = m.__dict__.get("forward")
    if n:
        log.warning("[Attention Toolkit] removed %d attention patch(es) left over from an earlier run", n)
    return n
