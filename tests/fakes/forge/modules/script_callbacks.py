"""``modules.script_callbacks`` as in Forge 2.x (A1111 1.10 layout).

In Forge, ``cfg_denoiser_callback`` and ``cfg_after_cfg_callback`` are called by the CFG denoiser, and
``cfg_denoised_callback`` exists but is never called.  Every callback runs inside try/except ->
``errors.report``.  ``callback_map`` holds the registered lists (``callbacks_<category>``);
``ordered_callbacks_map`` caches the sorted lists and is reused while the lengths match.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

from modules import errors, shared


def report_exception(c, job):
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image = image
        self.p = p
        self.filename = filename
        self.pnginfo = pnginfo


class ExtraNoiseParams:
    def __init__(self, noise, x, xi):
        self.noise = noise
        self.x = x
        self.xi = xi


class CFGDenoiserParams:
    def __init__(
        self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None
    ):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps


class BeforeTokenCounterParams:
    def __init__(self, prompt, steps, styles, is_positive=True):
        self.prompt = prompt
        self.steps = steps
        self.styles = styles
        self.is_positive = is_positive


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: Any
    name: str = "unnamed"


def add_callback(callbacks, fun, *, name=None, category="unknown", filename=None):
    if filename is None:
        stack = [x for x in inspect.stack(0) if x.filename != __file__]
        filename = stack[0].filename if stack else "unknown file"
    base = f"base/{os.path.basename(filename)}/{category}"
    if name is not None:
        base += f"/{name}"
    unique = base
    for index in range(1000):
        if not any(x.name == unique for x in callbacks):
            break
        unique = f"{base}-{index + 1}"
    callbacks.append(ScriptCallback(filename, fun, unique))


def sort_callbacks(category, unordered_callbacks, *, enable_user_sort=True):
    callbacks = unordered_callbacks.copy()
    if enable_user_sort:
        for name in reversed(getattr(shared.opts, "prioritized_callbacks_" + category, None) or []):
            index = next((i for i, c in enumerate(callbacks) if c.name == name), None)
            if index is not None:
                callbacks.insert(0, callbacks.pop(index))
    return callbacks


def ordered_callbacks(category, unordered_callbacks=None, *, enable_user_sort=True):
    if unordered_callbacks is None:
        unordered_callbacks = callback_map.get("callbacks_" + category, [])
    if not enable_user_sort:
        return sort_callbacks(category, unordered_callbacks, enable_user_sort=False)
    cached = ordered_callbacks_map.get(category)
    if cached is not None and len(cached) == len(unordered_callbacks):
        return cached
    callbacks = sort_callbacks(category, unordered_callbacks)
    ordered_callbacks_map[category] = callbacks
    return callbacks


def enumerate_callbacks():
    for category, callbacks in callback_map.items():
        yield category.removeprefix("callbacks_"), callbacks


callback_map: dict[str, list] = {
    "callbacks_app_started": [],
    "callbacks_model_loaded": [],
    "callbacks_ui_tabs": [],
    "callbacks_ui_train_tabs": [],
    "callbacks_ui_settings": [],
    "callbacks_before_image_saved": [],
    "callbacks_image_saved": [],
    "callbacks_extra_noise": [],
    "callbacks_cfg_denoiser": [],
    "callbacks_cfg_denoised": [],
    "callbacks_cfg_after_cfg": [],
    "callbacks_before_component": [],
    "callbacks_after_component": [],
    "callbacks_image_grid": [],
    "callbacks_infotext_pasted": [],
    "callbacks_script_unloaded": [],
    "callbacks_before_ui": [],
    "callbacks_on_reload": [],
    "callbacks_list_optimizers": [],
    "callbacks_list_unets": [],
    "callbacks_before_token_counter": [],
}

ordered_callbacks_map: dict = {}


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()
    ordered_callbacks_map.clear()


def _run(category, job, *args):
    for c in ordered_callbacks(category):
        try:
            c.callback(*args)
        except Exception:
            report_exception(c, job)


def app_started_callback(demo, app):
    _run("app_started", "app_started_callback", demo, app)


def app_reload_callback():
    _run("on_reload", "callbacks_on_reload")


def model_loaded_callback(sd_model):
    _run("model_loaded", "model_loaded_callback", sd_model)


def ui_settings_callback():
    _run("ui_settings", "ui_settings_callback")


def extra_noise_callback(params: ExtraNoiseParams):
    _run("extra_noise", "callbacks_extra_noise", params)


def cfg_denoiser_callback(params: CFGDenoiserParams):
    _run("cfg_denoiser", "cfg_denoiser_callback", params)


def cfg_denoised_callback(params: CFGDenoisedParams):
    _run("cfg_denoised", "cfg_denoised_callback", params)


def cfg_after_cfg_callback(params: AfterCFGCallbackParams):
    _run("cfg_after_cfg", "cfg_after_cfg_callback", params)


def before_component_callback(component, **kwargs):
    for c in ordered_callbacks("before_component"):
        try:
            c.callback(component, **kwargs)
        except Exception:
            report_exception(c, "before_component_callback")


def after_component_callback(component, **kwargs):
    for c in ordered_callbacks("after_component"):
        try:
            c.callback(component, **kwargs)
        except Exception:
            report_exception(c, "after_component_callback")


def infotext_pasted_callback(infotext: str, params: dict[str, Any]):
    _run("infotext_pasted", "infotext_pasted", infotext, params)


def script_unloaded_callback():
    for c in reversed(ordered_callbacks("script_unloaded")):
        try:
            c.callback()
        except Exception:
            report_exception(c, "script_unloaded")


def before_ui_callback():
    for c in reversed(ordered_callbacks("before_ui")):
        try:
            c.callback()
        except Exception:
            report_exception(c, "before_ui")


def list_optimizers_callback():
    res: list = []
    _run("list_optimizers", "list_optimizers", res)
    return res


def list_unets_callback():
    res: list = []
    _run("list_unets", "list_unets", res)
    return res


def before_token_counter_callback(params: BeforeTokenCounterParams):
    _run("before_token_counter", "before_token_counter", params)


def remove_current_script_callbacks():
    stack = [x for x in inspect.stack(0) if x.filename != __file__]
    filename = stack[0].filename if stack else "unknown file"
    if filename == "unknown file":
        return
    for lists in (callback_map.values(), ordered_callbacks_map.values()):
        for callback_list in lists:
            for cb in [cb for cb in callback_list if cb.script == filename]:
                callback_list.remove(cb)


def remove_callbacks_for_function(callback_func):
    for lists in (callback_map.values(), ordered_callbacks_map.values()):
        for callback_list in lists:
            for cb in [cb for cb in callback_list if cb.callback == callback_func]:
                callback_list.remove(cb)


def _register(category, key, callback, name):
    add_callback(callback_map[key], callback, name=name, category=category, filename=_caller_file())


def _caller_file():
    stack = [x for x in inspect.stack(0) if x.filename != __file__]
    return stack[0].filename if stack else "unknown file"


def on_app_started(callback, *, name=None):
    _register("app_started", "callbacks_app_started", callback, name)


def on_before_reload(callback, *, name=None):
    _register("on_reload", "callbacks_on_reload", callback, name)


def on_model_loaded(callback, *, name=None):
    _register("model_loaded", "callbacks_model_loaded", callback, name)


def on_ui_tabs(callback, *, name=None):
    _register("ui_tabs", "callbacks_ui_tabs", callback, name)


def on_ui_train_tabs(callback, *, name=None):
    _register("ui_train_tabs", "callbacks_ui_train_tabs", callback, name)


def on_ui_settings(callback, *, name=None):
    _register("ui_settings", "callbacks_ui_settings", callback, name)


def on_before_image_saved(callback, *, name=None):
    _register("before_image_saved", "callbacks_before_image_saved", callback, name)


def on_image_saved(callback, *, name=None):
    _register("image_saved", "callbacks_image_saved", callback, name)


def on_extra_noise(callback, *, name=None):
    _register("extra_noise", "callbacks_extra_noise", callback, name)


def on_cfg_denoiser(callback, *, name=None):
    _register("cfg_denoiser", "callbacks_cfg_denoiser", callback, name)


def on_cfg_denoised(callback, *, name=None):
    _register("cfg_denoised", "callbacks_cfg_denoised", callback, name)


def on_cfg_after_cfg(callback, *, name=None):
    _register("cfg_after_cfg", "callbacks_cfg_after_cfg", callback, name)


def on_before_component(callback, *, name=None):
    _register("before_component", "callbacks_before_component", callback, name)


def on_after_component(callback, *, name=None):
    _register("after_component", "callbacks_after_component", callback, name)


def on_image_grid(callback, *, name=None):
    _register("image_grid", "callbacks_image_grid", callback, name)


def on_infotext_pasted(callback, *, name=None):
    _register("infotext_pasted", "callbacks_infotext_pasted", callback, name)


def on_script_unloaded(callback, *, name=None):
    _register("script_unloaded", "callbacks_script_unloaded", callback, name)


def on_before_ui(callback, *, name=None):
    _register("before_ui", "callbacks_before_ui", callback, name)


def on_list_optimizers(callback, *, name=None):
    _register("list_optimizers", "callbacks_list_optimizers", callback, name)


def on_list_unets(callback, *, name=None):
    _register("list_unets", "callbacks_list_unets", callback, name)


def on_before_token_counter(callback, *, name=None):
    _register("before_token_counter", "callbacks_before_token_counter", callback, name)
