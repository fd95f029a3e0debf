"""``modules.api.models``: the same in A1111 1.10 and Forge 2.x (tests/fakes/common/api_models.py)."""

from tests.fakes.common.api_models import ScriptArg, ScriptInfo  # noqa: F401
