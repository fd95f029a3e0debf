"""``modules.ui_components`` (gradio 4): InputAccordion and the small helper components."""

from __future__ import annotations

import gradio as gr


class FormComponent:
    webui_do_not_create_gradio_pyi_thank_you = True

    def get_expected_parent(self):
        return gr.components.Form


class FormRow(gr.Row):
    pass


class FormColumn(gr.Column):
    pass


class FormGroup(gr.Group):
    pass


class FormHTML(FormComponent, gr.HTML):
    pass


class ToolButton(gr.Button):
    def __init__(self, value="", *args, elem_classes=None, **kwargs):
        super().__init__(*args, value=value, elem_classes=["tool", *(elem_classes or [])], **kwargs)


class InputAccordionImpl(gr.Checkbox):
    """A hidden checkbox (the input: True when open) followed by an Accordion that holds the controls."""

    webui_do_not_create_gradio_pyi_thank_you = True
    global_index = 0

    def __init__(self, value=None, setup=False, **kwargs):
        if not setup:
            super().__init__(value=value, **kwargs)
            return
        self.accordion_id = kwargs.get("elem_id")
        if self.accordion_id is None:
            self.accordion_id = f"input-accordion-{InputAccordionImpl.global_index}"
            InputAccordionImpl.global_index += 1
        super().__init__(value=value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        self.accordion = gr.Accordion(
            **{
                **kwargs,
                "elem_id": self.accordion_id,
                "label": kwargs.get("label", "Accordion"),
                "elem_classes": ["input-accordion"],
                "open": value,
            }
        )

    def extra(self):
        return gr.Column(elem_id=self.accordion_id + "-extra", elem_classes="input-accordion-extra", min_width=0)

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)

    def get_block_name(self):
        return "checkbox"


def InputAccordion(value=None, **kwargs):
    return InputAccordionImpl(value=value, setup=True, **kwargs)
