"""Double of modules/infotext_utils.py: parse 'key: value, key: "quoted, value"' infotext lines."""

import json
import re

_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_generation_parameters(text):
    res = {}
    lines = text.strip().split("\n")
    last = lines[-1]
    res["Prompt"] = lines[0]
    for k, v in _RE_PARAM.findall(last):
        v = v.strip()
        if v.startswith('"') and v.endswith('"'):
            v = json.loads(v)
        res[k.strip()] = v
    return res


def pasted_values(prompt, paste_fields):
    """``connect_paste``'s ``paste_func`` without gradio: one value per paste field, or ``paste.UNCHANGED``
    (``gr.update()``); see tests/fakes/common/paste.py."""
    from modules import script_callbacks

    from tests.fakes.common import paste

    return paste.paste(prompt, paste_fields, parse_generation_parameters, script_callbacks.infotext_pasted_callback)


def connect_paste(button, paste_fields, input_comp, override_settings_component=None, tabname=None):
    """The ↙ button: ``button.click`` pastes ``input_comp``'s text into ``paste_fields`` (as the WebUI does)."""
    import gradio as gr

    from tests.fakes.common import paste

    def paste_func(prompt):
        values = pasted_values(prompt, paste_fields)
        return [gr.update() if v is paste.UNCHANGED else gr.update(value=v) for v in values]

    button.click(fn=paste_func, inputs=[input_comp], outputs=[c for c, _ in paste_fields], show_progress="hidden")
