"""``modules.ui``: the same in A1111 1.10 and Forge 2.x (tests/fakes/common/ui.py)."""

from tests.fakes.common.ui import create_ui  # noqa: F401
