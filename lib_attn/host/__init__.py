"""The one place that knows which WebUI is running.  Only this package imports the host's
``modules`` / ``backend`` / ``ldm_patched``; everything else in ``lib_attn`` is host-free.  Adapters: ``a1111.py``;
``forge.py`` (Forge 2, Neo), ``reforge.py`` and ``classic.py``, which share ``forge_family.py``."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from types import ModuleType
from typing import Any

from lib_attn import session as sessions
from lib_attn import settings as S

log = logging.getLogger("lib_attn")


def _exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _defines(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except Exception:
        return False


def detect() -> str:
    """Which adapter runs here: ``"forge"`` for the WebUIs on Forge 2's ``backend/`` (Forge 2.x, Forge Neo, reForge's
    Forge-2-based branch); on the old ``ldm_patched`` backend ``"reforge"`` where its sampler has ComfyUI's newer
    ``calc_cond_batch`` (reForge ``main``/``dev``: pre-CFG functions after the model call) and ``"classic"`` where it
    has not (Forge Classic, Forge 1.x); ``"unsupported"`` for a ``modules_forge`` WebUI with neither backend; else
    ``"a1111"``."""
    if _exists("ldm_patched.modules.samplers"):  # no WebUI has both backends
        return "reforge" if _defines("ldm_patched.modules.samplers", "calc_cond_batch") else "classic"
    if _exists("backend.patcher"):
        return "forge"
    if _exists("modules_forge"):
        return "unsupported"
    return "a1111"


def host_name() -> str:
    """The WebUI's own name for itself, for messages (``modules_forge.forge_version.version`` where it has one)."""
    try:
        version = str(importlib.import_module("modules_forge.forge_version").version)
    except Exception:
        version = ""
    kind = detect()
    if kind == "forge":
        return f"Forge {version}".strip()
    if kind == "reforge":
        return f"reForge {version}".strip()
    if kind == "classic":
        return "Forge Classic" if version == "classic" else f"Forge {version} (ldm_patched)".strip()
    if kind == "unsupported":
        return f"Forge {version}".strip()
    return "AUTOMATIC1111"


def adapter() -> ModuleType:
    """The running WebUI's adapter; a WebUI the toolkit does not run on raises ``SettingsError`` saying so."""
    kind = detect()
    if kind == "unsupported":
        raise S.SettingsError(
            "host",
            "WebUI",
            f"{host_name()} has neither Forge 2's backend nor the ldm_patched one; the toolkit runs on AUTOMATIC1111 "
            "1.9+, Forge 2.x, Forge Neo, reForge and Forge Classic; nothing was changed",
        )
    return importlib.import_module(f"lib_attn.host.{kind}")


def checkpoint_titles() -> list[str]:
    """The WebUI's checkpoint list, as its own checkpoint dropdown shows it (empty where it cannot be read)."""
    try:
        from modules import sd_models

        return list(sd_models.checkpoint_tiles())
    except Exception as e:  # the UI still builds; the field takes any name
        log.warning("[Attention Toolkit] no checkpoint list: %s", e)
        return []


def settings_for(p: Any, args: tuple) -> S.Settings:
    """Script args, then overrides that XYZ axes put on ``p``.  Raises SettingsError."""
    settings = S.from_args(args)
    overrides = getattr(p, S.OVERRIDE_ATTR, None)
    if overrides:
        values = dict(overrides)
        for key in list(values):  # an axis on any field of a method switches that method on
            field = S.FIELD_BY_KEY.get(key)
            if field is not None and field.name != "enabled":
                values.setdefault(f"{field.section}_enabled", True)
        settings = settings.with_values(values)
    return settings


def process(p: Any, args: tuple) -> None:
    """``Script.process``: parse, write infotext, attach the per-generation session."""
    try:
        settings = settings_for(p, args)
    except S.SettingsError as e:
        log.error("[Attention Toolkit] %s", e)
        sessions.attach(p, sessions.FailedSession(e))
        return
    if not settings.any_active:
        return  # off: nothing is installed, output is the WebUI's own
    try:
        adapter().begin(p, settings)
    except S.SettingsError as e:
        log.error("[Attention Toolkit] %s", e)
        sessions.attach(p, sessions.FailedSession(e))
        return
    p.extra_generation_params.update(settings.to_infotext())


def before_every_sampling(p: Any) -> None:
    session = sessions.get(p)
    if session is not None and session.error is None:
        adapter().before_every_sampling(p)


def postprocess_image(p: Any, pp: Any) -> None:
    """``Script.postprocess_image``: the run objects that finish each image (``finish_image``)."""
    session = sessions.get(p)
    if session is None or getattr(pp, "image", None) is None:
        return
    index = int(getattr(pp, "index", getattr(p, "batch_index", 0)) or 0)
    for run in session.runs.values():
        if hasattr(run, "finish_image"):
            pp.image = run.finish_image(index, pp.image)


def postprocess(p: Any, processed: Any = None) -> None:
    """``Script.postprocess``: the run objects' extra images (``extra_images``) join the results (UI gallery and API
    images); then the session ends."""
    session = sessions.get(p)
    try:
        if processed is not None and session is not None and session.error is None:
            for run in session.runs.values():
                if hasattr(run, "extra_images"):
                    _append_images(processed, run.extra_images())
    finally:
        sessions.end(p)


def _append_images(processed: Any, extra: list) -> None:
    images = getattr(processed, "images", None)
    if extra and isinstance(images, list):
        infotexts = getattr(processed, "infotexts", None)
        if isinstance(infotexts, list) and infotexts:
            infotexts.extend([infotexts[0]] * len(extra))
        images.extend(extra)


def cleanup_model() -> int:
    if detect() == "unsupported":
        return 0  # nothing was ever installed there
    try:
        return adapter().cleanup_model()
    except Exception as e:  # never break a scripts reload
        log.warning("[Attention Toolkit] cleanup failed: %s", e)
        return 0
