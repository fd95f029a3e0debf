"""What a method is: its fields, its settings section, its per-pass plan, and its per-generation run.

A method lives in one folder, ``lib_attn/methods/<name>/``: ``__init__.py`` declares its :class:`Method`
(fields next to the code that reads them), ``core.py`` holds its pure tensor code, ``run.py`` its per-generation
state, ``hooks.py`` what it does at each host event.  :data:`lib_attn.methods.ORDER` lists the methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lib_attn.fields import Field, Section, section_class
from lib_attn.layers import LayerKey, LayerSelectorError


@dataclass(frozen=True)
class PlanContext:
    """What a method's plan may depend on: the pass and the model's attention layers."""

    is_hr_pass: bool
    available: tuple[LayerKey, ...]
    widths: dict[LayerKey, int]  # channel width of each layer (0 when unknown)
    img2img: bool  # the generation is an img2img one


@dataclass(frozen=True)
class Method:
    """One method.  ``plan(settings, ctx)`` returns its plan for a pass (None: inactive in that pass) and raises
    the field's SettingsError for bad values; ``run(p, settings, services)`` makes its per-generation run object
    (None: the method keeps no state).  Its host hooks are ``hooks_<family>.Hooks`` in its folder
    (:func:`lib_attn.hooks.make_hooks`)."""

    name: str
    title: str
    fields: tuple[Field, ...]
    plan: Callable[[Any, PlanContext], Any]
    section: type = Section  # a Section subclass with the method's properties and checks
    tabs: tuple[str, ...] = ("txt2img", "img2img")
    run: Callable[..., Any] | None = None
    settings_class: type = field(init=False)

    def __post_init__(self) -> None:
        for f in self.fields:
            if f.section != self.name:
                raise ValueError(f"field {f.api_name} declared in method {self.name}")
        object.__setattr__(self, "settings_class", section_class(self.name, self.fields, self.section))

    def field(self, name: str) -> Field:
        return self.settings_class.FIELDS[name]

    @contextlib.contextmanager
    def selector(self, name: str = "layers") -> Iterator[None]:
        """A layer selector that matches nothing becomes an error naming the field ``name``."""
        try:
            yield
        except LayerSelectorError as e:
            raise self.field(name).error(str(e)) from None


def sigma_schedule(sigmas: Any, field: Field, who: str) -> Any:
    """The ``sigmas`` a host passes to a sampler function (:meth:`Hooks.sampler_function`), which only its
    k-diffusion samplers have; else the error ``field`` gives: ``who`` needs one."""
    if sigmas is None:
        raise field.error(
            f"{who} needs a k-diffusion sampler (Euler, DPM++ 2M, ...; it only carries the loop), not a timestep "
            "sampler such as DDIM, PLMS or UniPC"
        )
    return sigmas
