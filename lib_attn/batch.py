"""Batch layouts: which rows of a model call are cond, uncond and extra (perturbed) rows.

A1111's CFG denoiser lays out one step as ``[cond rows (x AND sub-prompts)] + [B uncond rows]``.
PAG inserts ``B`` perturbed rows at the end of the cond section, so the denoiser's
``combine_denoised`` (which reads only the cond indices and the last B rows) is untouched::

    rows 0 .. n_cond-1              cond (conds_list order)
    rows n_cond .. n_cond+B-1       perturbed copies of each image's first cond row
    rows n_cond+B .. n_cond+2B-1    uncond

The model may be called once on all rows or in chunks (``batch_cond_uncond`` off, cond/uncond
token lengths differ, uncond skipped); chunks always come in row order, so a running row cursor
tells which rows a call holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class BatchLayout:
    n_cond: int  # cond rows before insertion
    n_images: int  # B
    first_cond: tuple[int, ...]  # per image, the row of its first cond (AND sub-prompt 0)

    @property
    def extra(self) -> range:
        """Rows of the perturbed copies after insertion."""
        return range(self.n_cond, self.n_cond + self.n_images)

    @property
    def total(self) -> int:
        """Rows after insertion (cond + extra + uncond)."""
        return self.n_cond + 2 * self.n_images

    @classmethod
    def from_repeats(cls, repeats: Sequence[int]) -> BatchLayout:
        """``repeats[i]`` = number of cond rows (AND sub-prompts) of image i."""
        firsts, row = [], 0
        for r in repeats:
            if r < 1:
                raise ValueError("every image needs at least one cond row")
            firsts.append(row)
            row += r
        return cls(row, len(repeats), tuple(firsts))


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
