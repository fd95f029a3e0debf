"""Double of modules/ui_components.py (only what extensions commonly import)."""

import gradio as gr


class InputAccordion(gr.Checkbox):
    pass
