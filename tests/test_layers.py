"""Layer keys from module names and the selector grammar."""

from __future__ import annotations

import pytest

from lib_attn.layers import LayerKey, LayerSelectorError, keys_from_module_names, select

SD1_NAMES = (
    [f"input_blocks.{n}.1.transformer_blocks.0.attn{a}" for n in (1, 2, 4, 5, 7, 8) for a in (1, 2)]
    + [f"middle_block.1.transformer_blocks.0.attn{a}" for a in (1, 2)]
    + [f"output_blocks.{n}.1.transformer_blocks.0.attn{a}" for n in range(3, 12) for a in (1, 2)]
    + ["input_blocks.1.1.proj_in", "time_embed.0", "output_blocks.2.1.conv"]
)
SDXL_NAMES = (
    [f"input_blocks.{n}.1.transformer_blocks.{i}.attn1" for n in (4, 5) for i in range(2)]
    + [f"input_blocks.{n}.1.transformer_blocks.{i}.attn1" for n in (7, 8) for i in range(10)]
    + [f"middle_block.1.transformer_blocks.{i}.attn1" for i in range(10)]
    + [f"output_blocks.{n}.1.transformer_blocks.{i}.attn1" for n in (0, 1, 2) for i in range(10)]
    + [f"output_blocks.{n}.1.transformer_blocks.{i}.attn1" for n in (3, 4, 5) for i in range(2)]
)


def test_keys_from_names_sd1():
    keys = keys_from_module_names(SD1_NAMES)
    self_attn = [k for k in keys if k.attn == "attn1"]
    assert len(self_attn) == 16  # SD1.5 has 16 self-attention layers
    assert self_attn[6] == LayerKey("middle", 0, 0, "attn1")  # execution order: down 0-5, mid 6, up 7-15
    assert LayerKey("input", 4, 0).module_path == "input_blocks.4.1.transformer_blocks.0.attn1"
    assert LayerKey("middle", 0, 3).module_path == "middle_block.1.transformer_blocks.3.attn1"
    assert LayerKey("output", 1, 2).forge_key == ("output", 1, 2)


def test_sdxl_count():
    assert len(keys_from_module_names(SDXL_NAMES)) == 70


@pytest.mark.parametrize(
    ("sel", "expected"),
    [
        ("middle", [("middle", 0, 0)]),
        ("mid", [("middle", 0, 0)]),
        ("input.4", [("input", 4, 0)]),
        ("output.11.0", [("output", 11, 0)]),
        ("input.4, middle", [("input", 4, 0), ("middle", 0, 0)]),
        ("MIDDLE ; input.1", [("input", 1, 0), ("middle", 0, 0)]),
    ],
)
def test_select_sd1(sel, expected):
    got = select(sel, keys_from_module_names(SD1_NAMES))
    assert [k[:3] for k in got] == expected


def test_select_parts_and_all():
    keys = keys_from_module_names(SDXL_NAMES)
    assert len(select("middle", keys)) == 10  # diffusers' "mid" covers all 10 SDXL mid blocks
    assert len(select("middle.3", keys)) == 1
    assert len(select("all", keys)) == 70
    assert len(select("input", keys)) == 24
    assert len(select("output.0", keys)) == 10
    assert select("middle, middle.2", keys) == select("middle", keys)


@pytest.mark.parametrize(
    ("sel", "fragment"),
    [
        ("", "empty selector"),
        ("input.3", "'input.3' matched no layer of this model; it has input.4 (x2), input.5 (x2)"),
        ("bottom", "is not a layer selector"),
        ("middle.0.1", "the middle block takes one index"),
        ("output.0.11", "matched no layer"),
    ],
)
def test_select_errors(sel, fragment):
    with pytest.raises(LayerSelectorError) as e:
        select(sel, keys_from_module_names(SDXL_NAMES))
    assert fragment in str(e.value)
