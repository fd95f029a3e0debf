"""Batch layouts: which rows of a model call are cond, uncond and extra rows, and whose.

A1111's CFG denoiser lays out one step as ``[cond rows (x AND sub-prompts)] + [B uncond rows]``.
Methods insert their extra rows as named groups at the end of the cond section, so the denoiser's
``combine_denoised`` (which reads only the cond indices and the last B rows) is untouched::

    rows 0 .. n_cond-1        cond (conds_list order)
    "pag"                     B perturbed copies of each image's first cond row
    "col_plain"               B plain (non-transferred) copies, for the colorization guidance
    "col_in", "col_ref", ...  colorization capture streams (when they ride in the batch)
    last B rows               uncond

The model may be called once on all rows or in chunks (``batch_cond_uncond`` off, cond/uncond
token lengths differ, uncond skipped); chunks always come in row order, so a running row cursor
tells which rows a call holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class BatchLayout:
    """Rows of one CFG step after the methods inserted their extra rows.

    ``groups``: the extra row groups in insertion order, each ``(name, sources)`` where
    ``sources[j]`` is the image (or reference) index row j of the group belongs to.  Groups sit
    back to back between the cond and the uncond rows.
    """

    n_cond: int  # cond rows before insertion
    n_images: int  # B
    first_cond: tuple[int, ...]  # per image, the row of its first cond (AND sub-prompt 0)
    cond_image: tuple[int, ...] = ()  # per cond row, its image
    groups: tuple[tuple[str, tuple[int, ...]], ...] = ()
    own_text: frozenset[str] = frozenset()  # groups with a text conditioning of their own (not their image's prompt)
    cond_weight: tuple[float, ...] = ()  # per cond row, its AND weight (empty: all 1)

    @property
    def n_extra(self) -> int:
        return sum(len(src) for _, src in self.groups)

    def group(self, name: str) -> range:
        """Rows of one extra group after insertion (empty when the group is absent)."""
        row = self.n_cond
        for g, src in self.groups:
            if g == name:
                return range(row, row + len(src))
            row += len(src)
        return range(row, row)

    def sources(self, name: str) -> tuple[int, ...]:
        return dict(self.groups).get(name, ())

    def span(self, names: Sequence[str]) -> range:
        """The rows of consecutive groups ``names`` (which must be adjacent in ``groups``)."""
        rows = [self.group(n) for n in names if len(self.group(n))]
        if not rows:
            return range(self.n_cond, self.n_cond)
        return range(rows[0].start, rows[-1].stop)

    @property
    def extra(self) -> range:
        """All inserted rows."""
        return range(self.n_cond, self.n_cond + self.n_extra)

    @property
    def uncond(self) -> range:
        start = self.n_cond + self.n_extra
        return range(start, start + self.n_images)

    @property
    def total(self) -> int:
        """Rows after insertion (cond + extra + uncond)."""
        return self.n_cond + self.n_extra + self.n_images

    def image_of_row(self, row: int) -> int | None:
        """The image a cond or uncond row belongs to; None for extra rows."""
        if row < self.n_cond:
            return self.cond_image[row]
        if row in self.uncond:
            return row - self.uncond.start
        return None

    def with_groups(self, groups: Sequence[tuple[str, Sequence[int]]], own_text: Sequence[str] = ()) -> BatchLayout:
        return dataclasses.replace(
            self, groups=tuple((g, tuple(src)) for g, src in groups), own_text=frozenset(own_text)
        )

    def prompt_rows(self) -> dict[int, int]:
        """``{row: image}`` of every row conditioned on its image's prompt: the cond rows and the inserted rows that
        copy them (not the uncond rows, nor groups with a text of their own)."""
        out = dict(enumerate(self.cond_image))
        for name, src in self.groups:
            if name not in self.own_text:
                out.update(zip(self.group(name), src, strict=True))
        return out

    def weight(self, row: int) -> float:
        return self.cond_weight[row] if self.cond_weight else 1.0

    @classmethod
    def from_repeats(cls, repeats: Sequence[int], weights: Sequence[float] = ()) -> BatchLayout:
        """``repeats[i]`` = number of cond rows (AND sub-prompts) of image i; no extra rows (the rows as the host
        made them: cond rows, then uncond rows); ``weights``: each cond row's AND weight (empty: all 1)."""
        firsts, images, row = [], [], 0
        for i, r in enumerate(repeats):
            if r < 1:
                raise ValueError("every image needs at least one cond row")
            firsts.append(row)
            images += [i] * r
            row += r
        n = len(repeats)
        return cls(row, n, tuple(firsts), tuple(images), cond_weight=tuple(float(w) for w in weights))


def take_rows(t: Any, rows: Sequence[int]) -> Any:
    """Rows of a tensor or of every tensor of a dict cond (SDXL ``{'crossattn', 'vector'}``)."""
    if isinstance(t, Mapping):
        return {k: take_rows(v, rows) for k, v in t.items()}
    if isinstance(t, Tensor):
        return t[list(rows)]
    return t


def insert_rows(t: Any, at: int, new: Any) -> Any:
    """Insert ``new`` rows before row ``at`` (tensors, or dicts of tensors key by key)."""
    if isinstance(t, Mapping):
        return {k: insert_rows(v, at, new[k]) for k, v in t.items()}
    if isinstance(t, Tensor):
        return torch.cat([t[:at], new, t[at:]], dim=0)
    return t


def local_span(span: range, call_start: int, call_rows: int, attn_rows: int) -> tuple[int, int] | None:
    """Rows of ``span`` (global rows) inside one model call, in the attention input's row space.

    ``call_start``/``call_rows``: the call's first global row and row count.  ``attn_rows``: the
    batch size the attention layer sees; a multiple k of ``call_rows`` means each row was split in
    k consecutive tiles (Hypertile), so the span is scaled by k.  None when there is no overlap or
    the shapes don't fit that pattern.
    """
    a = max(span.start, call_start)
    b = min(span.stop, call_start + call_rows)
    if a >= b or call_rows <= 0 or attn_rows % call_rows:
        return None
    k = attn_rows // call_rows
    return (a - call_start) * k, (b - call_start) * k


def _slice(v: Any, n: int, a: int, b: int) -> Any:
    if isinstance(v, (list, tuple)):  # a list of contexts (one per transformer depth)
        return type(v)(_slice(t, n, a, b) for t in v)
    return v[a:b] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v


def slice_args(args: tuple, n: int, a: int, b: int) -> tuple:
    """Rows a..b of every tensor argument with ``n`` rows (others as they are)."""
    return tuple(_slice(v, n, a, b) for v in args)


def slice_kwargs(kwargs: dict, n: int, a: int, b: int) -> dict:
    return {k: _slice(v, n, a, b) for k, v in kwargs.items()}
