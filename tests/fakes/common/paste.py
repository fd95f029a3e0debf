"""The paste of ``modules/infotext_utils.py`` (A1111 1.10 and Forge 2.x alike): ``connect_paste``'s ``paste_func``
and the "send to" copy of ``connect_paste_params_buttons``.

Pasting (the ↙ button, PNG info's "send to"): ``parse_generation_parameters(prompt)``, then every
``infotext_pasted`` callback may change the parsed dict, then each ``(control, key)`` of the tab's paste fields
takes ``key(params)`` when ``key`` is callable, else ``params.get(key)``; ``None`` leaves the control unchanged,
anything else is converted by the type of the control's current value (``bool``: the string ``"False"`` is false,
anything else by ``bool()``; ``int``: through ``float``; else ``type(value)(v)``), and a failed conversion also
leaves the control unchanged.

"Send to img2img" from txt2img's gallery copies, control to control, the txt2img paste fields whose key is in
``['Prompt', 'Negative prompt', 'Steps', 'Face restoration'] + paste_field_names`` to the img2img paste fields with
those keys, in order (a function key is never in that list, so such a control is never copied).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

UNCHANGED = object()  # what ``gr.update()`` (no value) stands for in :func:`paste_values`

SEND_TO_BASE_NAMES = ["Prompt", "Negative prompt", "Steps", "Face restoration"]


def paste_values(paste_fields: Sequence[tuple[Any, Any]], params: dict, report: Callable | None = None) -> list:
    """Per paste field: the value the control takes, or :data:`UNCHANGED`."""
    out: list = []
    for output, key in paste_fields:
        if callable(key):
            try:
                v = key(params)
            except Exception:
                if report is not None:
                    report(f"Error executing {key}")
                v = None
        else:
            v = params.get(key)
        if v is None:
            out.append(UNCHANGED)
            continue
        try:
            valtype = type(getattr(output, "value", None))
            if valtype is bool and v == "False":
                val = False
            elif valtype is int:
                val = float(v)
            else:
                val = valtype(v)
        except Exception:
            out.append(UNCHANGED)
            continue
        out.append(val)
    return out


def paste(prompt: str, paste_fields, parse: Callable[[str], dict], pasted_callback: Callable[[str, dict], None]):
    """``paste_func``: parse, run the ``infotext_pasted`` callbacks, convert (see :func:`paste_values`)."""
    params = parse(prompt)
    pasted_callback(prompt, params)
    return paste_values(paste_fields, params)


def send_to_pairs(source_fields, target_fields, paste_field_names: Sequence[str]) -> tuple[list, list]:
    """The ``(inputs, outputs)`` of "send to": source and target controls whose key is a name in the list."""
    names = SEND_TO_BASE_NAMES + list(paste_field_names)
    inputs = [c for c, key in source_fields if isinstance(key, str) and key in names]
    outputs = [c for c, key in target_fields if isinstance(key, str) and key in names]
    return inputs, outputs


def pasted_values(prompt, paste_fields) -> list:
    """``connect_paste``'s ``paste_func`` without gradio, in the running double (``modules``): its
    ``parse_generation_parameters`` and ``infotext_pasted`` callbacks; one value per paste field, or
    :data:`UNCHANGED`."""
    from modules import infotext_utils, script_callbacks

    return paste(prompt, paste_fields, infotext_utils.parse_generation_parameters,
                 script_callbacks.infotext_pasted_callback)


def connect_paste(button, paste_fields, input_comp, override_settings_component=None, tabname=None) -> None:
    """The ↙ button: ``button.click`` pastes ``input_comp``'s text into ``paste_fields`` (as the WebUI does)."""
    import gradio as gr

    def paste_func(prompt):
        return [gr.update() if v is UNCHANGED else gr.update(value=v) for v in pasted_values(prompt, paste_fields)]

    button.click(fn=paste_func, inputs=[input_comp], outputs=[c for c, _ in paste_fields], show_progress="hidden")
