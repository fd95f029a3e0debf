"""The one API of the two host doubles' harness classes: ``tests.fakes.a1111_double.A1111Host`` (from
``a1111_host()``) and ``tests.fakes.forge_env.ForgeHost`` (from ``forge_host()``).

Tests written against :class:`Harness` run on either double.  Each class has more than this (A1111: ``runners``,
``server``; Forge: ``backend``, ``last_p``, ``api()``, ``load_checkpoint``, ``txt2img(args_by_title=...,
all_script_args=...)``, ``img2img`` with a default picture); those are host-specific.

Differences that stay, because they model the hosts:

* ``default_args()`` position 0 (the selected script's index) is ``None`` on A1111 and ``0`` on Forge.
* ``unet_calls`` entries: both have ``rows``, ``shape`` and ``inference_mode``.  A1111 records
  ``sd_model.apply_model`` calls (only of models made by the checkpoints ``a1111_host`` registers) and adds
  ``timestep``; Forge records ``backend.modules.k_model`` ``apply_model`` calls and adds ``sigma`` and
  ``cond_or_uncond``.
* The 200 body of ``api_txt2img``/``api_img2img`` is the host's response (``images``, ``parameters``, ``info``);
  Forge's also has ``processed`` (the ``Processed`` object, double only).
"""

from __future__ import annotations

import types
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Harness(Protocol):
    modules: Any
    """The host's ``modules`` package: ``h.modules.shared``, ``h.modules.script_callbacks``, ..."""

    loaded_scripts: list
    """``(path, module)`` per loaded script file, in load order (``load_script`` appends; ``start`` sets it)."""

    unet_calls: list[dict]
    """One dict per model call since the double was entered (tests may ``clear()`` it); keys above."""

    @property
    def unet_rows(self) -> list[int]:
        """``[c["rows"] for c in unet_calls]``."""

    @property
    def errors(self) -> list:
        """What ``modules.errors.report`` recorded (hook and callback failures)."""

    @property
    def sd_model(self) -> Any:
        """``shared.sd_model``."""

    def callback_count(self, category: str | None = None) -> int:
        """With ``category`` (e.g. ``"cfg_denoiser"``): how many callbacks of that category are registered.
        Without: how many CFG callbacks (``cfg_denoiser``, ``cfg_denoised``, ``cfg_after_cfg``) are registered
        that were not there right after the last ``load_script``/``start``; 0 after a clean generation."""

    def load_script(self, path) -> types.ModuleType:
        """Load a script file as the WebUI does and give both runners an instance with its ``ui()`` built."""

    def start(self, extension_scripts, *, nowebui: bool, files=None) -> Any:
        """Start-up as webui.py does it (all scripts, the API, the callbacks); returns the double's ``Api``."""

    def script(self, title: str | None = None, *, is_img2img: bool = False) -> Any:
        """The runner's instance of a loaded script by title; default: the last loaded script file's; None if
        there is none."""

    def default_args(self, *, is_img2img: bool = False) -> list:
        """The full positional script args the WebUI starts from (every script's ``ui()`` values)."""

    def txt2img(self, *, script_args=None, **kw) -> Any:
        """UI-style generation: processing fields as keywords, ``script_args`` for the script ``script()``
        returns (from its first arg); returns the ``Processed``."""

    def img2img(self, *, script_args=None, **kw) -> Any:
        """As ``txt2img`` (``init_images``, ``mask``, ``denoising_strength``, ... as keywords)."""

    def api_txt2img(self, payload: dict) -> tuple[int, dict]:
        """``/sdapi/v1/txt2img`` with a JSON-like payload: ``(status_code, body)``.  An ``HTTPException`` gives
        its status and ``{"detail": ...}``; any other exception 500 and ``{"error", "detail", "body", "errors"}``
        as the WebUI's API middleware answers."""

    def api_img2img(self, payload: dict) -> tuple[int, dict]:
        """``/sdapi/v1/img2img``; as ``api_txt2img``."""


CFG_CATEGORIES = ("cfg_denoiser", "cfg_denoised", "cfg_after_cfg")


class HarnessBase:
    """What the two doubles' harness classes share (they read the same names from their ``modules``)."""

    modules: Any
    unet_calls: list[dict]

    @property
    def unet_rows(self) -> list[int]:
        return [c["rows"] for c in self.unet_calls]

    @property
    def errors(self) -> list:
        """What the double's ``errors.report`` recorded (hook and callback failures)."""
        return self.modules.errors.reported

    @property
    def sd_model(self):
        return self.modules.shared.sd_model

    def callback_count(self, category: str | None = None) -> int:
        """Registered script callbacks.  With ``category`` (e.g. ``"cfg_denoiser"``): all of that category;
        without: the CFG callbacks (``cfg_denoiser``, ``cfg_denoised``, ``cfg_after_cfg``) that did not exist
        right after the last ``load_script``/``start``, i.e. those a generation left behind."""
        cmap = self.modules.script_callbacks.callback_map
        if category is not None:
            return len(cmap["callbacks_" + category])
        return sum(1 for k in CFG_CATEGORIES for c in cmap["callbacks_" + k] if id(c) not in self._baseline)

    def _snapshot_callbacks(self) -> None:
        self._baseline_refs = [c for lst in self.modules.script_callbacks.callback_map.values() for c in lst]
        self._baseline = {id(c) for c in self._baseline_refs}
