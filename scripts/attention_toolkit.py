"""Attention Toolkit: the only script file.  It builds the UI and hands every hook to lib_attn.host."""

from __future__ import annotations

from modules import script_callbacks, scripts

from lib_attn import host
from lib_attn import settings as S


class AttentionToolkitScript(scripts.Script):
    sorting_priority = 15  # Forge: place below the built-in sections

    def title(self):
        return S.TITLE  # also the API key in alwayson_scripts: never change it

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from lib_attn import ui

        parts = ui.build(is_img2img, self.elem_id)
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


def _register_xyz():
    from lib_attn.host import xyz

    xyz.register()


script_callbacks.on_before_ui(_register_xyz)
script_callbacks.on_script_unloaded(host.cleanup_model)
