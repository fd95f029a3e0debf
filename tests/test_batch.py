"""Batch layout and row bookkeeping."""

from __future__ import annotations

import torch

from lib_attn.batch import BatchLayout, insert_rows, local_span, take_rows


def test_layout_with_and_prompts():
    lay = BatchLayout.from_repeats([2, 1, 3])  # image 0 has "a AND b", image 2 three sub-prompts
    assert lay.extra == range(6, 6) and lay.total == 9  # the host's rows: no extra rows yet
    lay = lay.with_groups([("pag", range(3))])  # one row per image inserted
    assert lay.first_cond == (0, 2, 3)
    assert lay.n_cond == 6 and lay.n_images == 3
    assert lay.extra == range(6, 9)
    assert lay.total == 12


def test_insert_and_take_rows_tensor_and_dict():
    x = torch.arange(5.0).view(5, 1)
    y = insert_rows(x, 3, take_rows(x, [0, 2]))
    assert y.flatten().tolist() == [0, 1, 2, 0, 2, 3, 4]
    d = {"crossattn": torch.arange(4.0).view(4, 1, 1), "vector": torch.arange(4.0).view(4, 1)}
    d2 = insert_rows(d, 2, take_rows(d, [1]))
    assert d2["crossattn"].flatten().tolist() == [0, 1, 1, 2, 3]
    assert d2["vector"].flatten().tolist() == [0, 1, 1, 2, 3]


def test_local_span_chunked_calls_and_tiles():
    extra = range(4, 6)  # rows 4,5 of 8
    assert local_span(extra, 0, 8, 8) == (4, 6)  # one call
    assert local_span(extra, 0, 2, 2) is None  # chunk 0..1
    assert local_span(extra, 4, 2, 2) == (0, 2)  # chunk 4..5
    assert local_span(extra, 2, 3, 3) == (2, 3)  # chunk 2..4 holds row 4
    assert local_span(extra, 0, 8, 32) == (16, 24)  # hypertile: 4 tiles per row
    assert local_span(extra, 0, 8, 12) is None  # unknown row pattern: leave it alone
