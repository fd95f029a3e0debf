"""``modules.infotext_utils`` (quote / unquote / parse_generation_parameters)."""

from __future__ import annotations

import json
import re

re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
paste_fields: dict = {}


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str) -> dict:
    res = {}
    lines = x.strip().split("\n")
    prompt, negative, params_line = [], [], ""
    if lines and len(re_param.findall(lines[-1])) >= 3:
        params_line = lines.pop()
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[16:].strip()
        (negative if in_negative else prompt).append(line)
    res["Prompt"] = "\n".join(prompt)
    res["Negative prompt"] = "\n".join(negative)
    for k, v in re_param.findall(params_line):
        res[k] = unquote(v)
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
