"""Test double of Forge 2.x ``modules`` (the A1111-compatible layer of Forge)."""
