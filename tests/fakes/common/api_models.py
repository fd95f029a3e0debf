"""``modules.api.models`` of both doubles (the parts the scripts machinery uses)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class ScriptArg:
    label: str = None
    value: Any = None
    minimum: Any = None
    maximum: Any = None
    step: Any = None
    choices: list | None = None


@dataclasses.dataclass
class ScriptInfo:
    name: str = None
    is_alwayson: bool = None
    is_img2img: bool = None
    args: list = dataclasses.field(default_factory=list)
