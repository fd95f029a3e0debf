"""Canonical attention-layer keys and the layer-selector grammar.

Both hosts name UNet attention modules the same way (ldm / sgm / ldm_patched / Forge backend)::

    input_blocks.{n}.1.transformer_blocks.{i}.attn{1,2}
    middle_block.1.transformer_blocks.{i}.attn{1,2}
    output_blocks.{n}.1.transformer_blocks.{i}.attn{1,2}

A :class:`LayerKey` is ``(block, number, index, attn)`` with block in ``input|middle|output``,
``number`` the index in ``input_blocks``/``output_blocks`` (0 for the middle block) and
``index`` the transformer block inside that SpatialTransformer.  Forge's attention-replace
patch key is ``(block, number, index)``.

Selectors (comma separated, case-insensitive):

* ``all`` every layer; ``input`` / ``middle`` / ``output`` (aliases ``down``, ``mid``, ``up``) a whole part;
* ``input.4`` every transformer block of ``input_blocks.4``; ``output.1.0`` one transformer block;
* ``middle.3`` transformer block 3 of the middle block.

A selector that matches nothing is an error that lists what exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

BLOCKS = ("input", "middle", "output")
_ALIASES = {"down": "input", "in": "input", "mid": "middle", "up": "output", "out": "output"}
_NAME_RE = re.compile(
    r"^(?:(?P<io>input|output)_blocks\.(?P<n>\d+)|middle_block)\.1\.transformer_blocks\.(?P<i>\d+)\.(?P<attn>attn[12])$"
)


class LayerSelectorError(ValueError):
    pass


class LayerKey(NamedTuple):
    block: str  # "input" | "middle" | "output"
    number: int  # index in input_blocks / output_blocks; 0 for the middle block
    index: int  # transformer block inside the SpatialTransformer
    attn: str = "attn1"  # "attn1" self-attention, "attn2" cross-attention

    @property
    def module_path(self) -> str:
        """Module path under the UNet (``diffusion_model``)."""
        head = "middle_block" if self.block == "middle" else f"{self.block}_blocks.{self.number}"
        return f"{head}.1.transformer_blocks.{self.index}.{self.attn}"

    @property
    def forge_key(self) -> tuple[str, int, int]:
        return (self.block, self.number, self.index)

    @property
    def short(self) -> str:
        if self.block == "middle":
            return f"middle.{self.index}"
        return f"{self.block}.{self.number}.{self.index}"

    @classmethod
    def parse_module_path(cls, path: str) -> LayerKey | None:
        m = _NAME_RE.match(path)
        if m is None:
            return None
        block = m["io"] or "middle"
        return cls(block, int(m["n"] or 0), int(m["i"]), m["attn"])


def keys_from_module_names(names: Iterable[str]) -> list[LayerKey]:
    """All layer keys found among module paths (e.g. ``unet.named_modules()`` names), in model order."""
    out = [k for k in (LayerKey.parse_module_path(n) for n in names) if k is not None]
    order = {"input": 0, "middle": 1, "output": 2}
    return sorted(out, key=lambda k: (order[k.block], k.number, k.index, k.attn))


def _match(sel: str, key: LayerKey) -> bool:
    parts = sel.split(".")
    block = _ALIASES.get(parts[0], parts[0])
    if block == "all" and len(parts) == 1:
        return True
    if block not in BLOCKS or block != key.block:
        return False
    nums = [int(p) for p in parts[1:]]
    if block == "middle":
        # middle.{index}
        return len(nums) == 0 or (len(nums) == 1 and nums[0] == key.index)
    if len(nums) >= 1 and nums[0] != key.number:
        return False
    return not (len(nums) >= 2 and nums[1] != key.index)


_SEL_RE = re.compile(r"^(all|input|middle|output|down|mid|up|in|out)(\.\d+){0,2}$")


def parse_selector(text: str) -> list[str]:
    """Split and check the syntax of a selector string; returns normalized selectors."""
    sels = [s.strip().lower() for s in (text or "").replace(";", ",").split(",") if s.strip()]
    if not sels:
        raise LayerSelectorError("no layer selected (empty selector); use e.g. 'middle'")
    for s in sels:
        if not _SEL_RE.match(s):
            raise LayerSelectorError(
                f"'{s}' is not a layer selector; use all, input, middle, output, "
                "input.N, output.N, output.N.I or middle.I"
            )
        if s.startswith(("middle", "mid")) and s.count(".") > 1:
            raise LayerSelectorError(f"'{s}': the middle block takes one index (middle.I)")
    return sels


def select(text: str, available: Iterable[LayerKey], attn: str = "attn1") -> list[LayerKey]:
    """Keys of kind ``attn`` matched by selector ``text``.  Raises if any selector matches nothing."""
    avail = [k for k in available if k.attn == attn]
    sels = parse_selector(text)
    chosen: list[LayerKey] = []
    for s in sels:
        hits = [k for k in avail if _match(s, k)]
        if not hits:
            raise LayerSelectorError(f"'{s}' matched no layer of this model; it has {describe(avail)}")
        chosen.extend(k for k in hits if k not in chosen)
    return [k for k in avail if k in chosen]


def describe(keys: Iterable[LayerKey]) -> str:
    """Compact summary such as ``input.1, input.2, input.4, middle (x2), output.3 ...``."""
    groups: dict[str, int] = {}
    for k in keys:
        name = "middle" if k.block == "middle" else f"{k.block}.{k.number}"
        groups[name] = groups.get(name, 0) + 1
    return ", ".join(name if n == 1 else f"{name} (x{n})" for name, n in groups.items()) or "no attention layers"
