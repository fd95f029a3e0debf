"""XYZ-plot axes for every parameter of the settings table (A1111 and Forge share xyz_grid)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from modules import scripts

from lib_attn import settings as S

log = logging.getLogger("lib_attn")


def find_xyz_module() -> Any:
    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid") and hasattr(data, "module"):
            return data.module
    return None


def _apply(field: S.Field):
    def apply(p: Any, x: Any, xs: Any) -> None:
        # XYZ works on a shallow copy of p: build a new dict so cells don't share overrides.
        overrides = dict(getattr(p, S.OVERRIDE_ATTR, None) or {})
        overrides[field.key] = field.parse(x)
        setattr(p, S.OVERRIDE_ATTR, overrides)

    return apply


def _axis_type(field: S.Field) -> type:
    return {"float": float, "int": int}.get(field.kind, str)


def _choices(field: S.Field):
    if field.kind == "bool":
        return lambda: ["True", "False"]
    if field.kind == "choice":
        return lambda: list(field.choices or ())
    return None


def img2img_axis_class(xyz: Any) -> type:
    """The plot's class of img2img-only axes.  A1111, Forge and Neo define ``AxisOptionImg2Img`` in xyz_grid itself;
    Forge Classic's xyz_grid imports only ``AxisOption`` from its ``lib_xyz.classes``, which defines it.  Elsewhere a
    subclass marked ``is_img2img``: the plot lists a plain ``AxisOption`` on both tabs and any other class by that
    mark."""
    for module in (xyz, sys.modules.get(getattr(xyz.AxisOption, "__module__", ""))):
        cls = getattr(module, "AxisOptionImg2Img", None)
        if isinstance(cls, type):
            return cls

    return type("AxisOptionImg2Img", (xyz.AxisOption,), {"is_img2img": True})


def axis_options(xyz: Any) -> list[Any]:
    """One axis per field; image fields have none (an image is not a value one types in a cell), and
    sections that exist only in img2img get img2img-only axes."""
    out = []
    for field in S.FIELDS:
        if field.kind == "image":
            continue
        kwargs = {}
        choices = _choices(field)
        if choices is not None:
            kwargs["choices"] = choices
        cls = xyz.AxisOption
        if S.SECTION_TABS.get(field.section) == ("img2img",):
            cls = img2img_axis_class(xyz)
        out.append(cls(S.XYZ_PREFIX + field.infotext, _axis_type(field), _apply(field), **kwargs))
    return out


def register(*, quiet: bool = False) -> int:
    """Add our axes once (idempotent); returns how many were added.  Called at every point where xyz_grid may
    have been loaded before its ``ui()`` lists the axes (see scripts/attention_toolkit.py); ``quiet`` leaves a
    missing xyz_grid unlogged for all but the last of them."""
    xyz = find_xyz_module()
    if xyz is None:
        if not quiet:
            log.info("[Attention Toolkit] xyz_grid not found; no XYZ axes added")
        return 0
    have = {getattr(o, "label", None) for o in xyz.axis_options}
    new = [o for o in axis_options(xyz) if o.label not in have]
    xyz.axis_options.extend(new)
    return len(new)
