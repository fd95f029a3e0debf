"""Double of modules/script_callbacks.py (A1111 1.10): callback registry and the CFG params classes."""

import inspect
import os
from collections import namedtuple

from modules import errors

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
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


NAMES = ["app_started", "model_loaded", "ui_settings", "before_ui", "script_unloaded", "cfg_denoiser",
         "cfg_denoised", "cfg_after_cfg", "infotext_pasted", "before_image_saved", "image_saved", "after_component"]
callback_map = {f"callbacks_{n}": [] for n in NAMES}


def _caller_file():
    for frame in inspect.stack()[2:]:
        if os.path.abspath(frame.filename) != os.path.abspath(__file__):
            return frame.filename
    return "unknown"


def add_callback(callbacks, fun, name=None):
    callbacks.append(ScriptCallback(_caller_file(), fun, name))


def _run(kind, *args):
    for c in list(callback_map[f"callbacks_{kind}"]):
        try:
            c.callback(*args)
        except Exception:
            errors.report(f"Error executing callback {kind}_callback for {c.script}", exc_info=True)


def app_started_callback(demo, app): _run("app_started", demo, app)
def model_loaded_callback(sd_model): _run("model_loaded", sd_model)
def ui_settings_callback(): _run("ui_settings")
def before_ui_callback(): _run("before_ui")
def script_unloaded_callback(): _run("script_unloaded")
def cfg_denoiser_callback(params): _run("cfg_denoiser", params)
def cfg_denoised_callback(params): _run("cfg_denoised", params)
def cfg_after_cfg_callback(params): _run("cfg_after_cfg", params)
def infotext_pasted_callback(infotext, params): _run("infotext_pasted", infotext, params)


def after_component_callback(component, **kwargs):
    """Called by the WebUI's patched gradio component ``__init__`` with the component and its constructor kwargs."""
    for c in list(callback_map["callbacks_after_component"]):
        try:
            c.callback(component, **kwargs)
        except Exception:
            errors.report(f"Error executing callback after_component_callback for {c.script}", exc_info=True)


def on_app_started(callback, *, name=None): add_callback(callback_map["callbacks_app_started"], callback, name)
def on_model_loaded(callback, *, name=None): add_callback(callback_map["callbacks_model_loaded"], callback, name)
def on_ui_settings(callback, *, name=None): add_callback(callback_map["callbacks_ui_settings"], callback, name)
def on_before_ui(callback, *, name=None): add_callback(callback_map["callbacks_before_ui"], callback, name)
def on_script_unloaded(callback, *, name=None): add_callback(callback_map["callbacks_script_unloaded"], callback, name)
def on_cfg_denoiser(callback, *, name=None): add_callback(callback_map["callbacks_cfg_denoiser"], callback, name)
def on_cfg_denoised(callback, *, name=None): add_callback(callback_map["callbacks_cfg_denoised"], callback, name)
def on_cfg_after_cfg(callback, *, name=None): add_callback(callback_map["callbacks_cfg_after_cfg"], callback, name)
def on_infotext_pasted(callback, *, name=None): add_callback(callback_map["callbacks_infotext_pasted"], callback, name)
def on_after_component(callback, *, name=None): add_callback(callback_map["callbacks_after_component"], callback, name)


def remove_callbacks_for_function(callback_func):
    for callbacks in callback_map.values():
        for c in [c for c in callbacks if c.callback == callback_func]:
            callbacks.remove(c)


def remove_current_script_callbacks():
    filename = _caller_file()
    for callbacks in callback_map.values():
        for c in [c for c in callbacks if c.script == filename]:
            callbacks.remove(c)


def clear_callbacks():
    for callbacks in callback_map.values():
        callbacks.clear()
