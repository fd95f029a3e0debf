"""Attention Toolkit: the only script file.  It builds the UI and hands every hook to lib_attn.host."""

from __future__ import annotations

from modules import script_callbacks, scripts

from lib_attn import host
from lib_attn import settings as S


class AttentionToolkitScript(scripts.Script):
    sorting_priority = 15  # Forge: place below the built-in sections

    def __init__(self):
        super().__init__()
        # The runners create every script (initialize_scripts) after all script files are loaded and before any
        # ui() call, xyz_grid's included: this adds our axes even where xyz_grid loads after this file.
        _register_xyz(quiet=True)

    def title(self):
        return S.TITLE  # also the API key in alwayson_scripts: never change it

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from lib_attn import ui

        parts = ui.build(is_img2img, self.elem_id)
        ui.SEND_TO.tab_built("img2img" if is_img2img else "txt2img", parts)
        self.infotext_fields = parts.infotext_fields
        self.paste_field_names = parts.paste_field_names
        return parts.components

    def process(self, p, *args):
        host.process(p, args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        host.before_every_sampling(p)

    def postprocess_image(self, p, pp, *args):
        host.postprocess_image(p, pp)

    def postprocess(self, p, processed, *args):
        host.postprocess(p, processed)


def _after_component(component, **kwargs):
    # every component the WebUI makes; lib_attn.ui.SendToImg2img keeps the "send to img2img" button
    from lib_attn import ui

    ui.SEND_TO.component(component, kwargs.get("elem_id") or getattr(component, "elem_id", None))


def _register_xyz(quiet=False):
    from lib_attn.host import xyz

    xyz.register(quiet=quiet)


# XYZ axes must exist before xyz_grid's ui() builds its axis list (the API's axis indices and /script-info choices
# come from it).  With --nowebui, webui.py's api_only() (Forge: api_only_worker()) builds the UI inside Api() and
# only then runs before_ui callbacks, so on_before_ui alone is too late there.  The built-in scripts/xyz_grid.py
# loads before extension scripts, so registering now covers that case; __init__ above covers any other order.
_register_xyz(quiet=True)
script_callbacks.on_before_ui(_register_xyz)
script_callbacks.on_after_component(_after_component)
script_callbacks.on_script_unloaded(host.cleanup_model)
