"""``modules.ui`` of both doubles: what ``create_ui()`` does with the script runners (Forge 2.x and A1111 1.10 alike).

Each tab's runner creates its script instances (``initialize_scripts``) and builds every script's controls inside
the tab's Blocks (``prepare_ui`` + ``setup_ui``), which calls each script's ``ui()`` and records its ``api_info``
(what ``/sdapi/v1/script-info`` lists).  webui.py runs it after ``before_ui_callback()``; with ``--nowebui`` it runs
only inside ``Api()`` (modules/api/api.py), before ``before_ui_callback()``.
"""

from __future__ import annotations


def create_ui():
    import gradio as gr
    from modules import scripts

    scripts.scripts_current = scripts.scripts_txt2img
    scripts.scripts_txt2img.initialize_scripts(is_img2img=False)
    with gr.Blocks() as demo:
        scripts.scripts_txt2img.prepare_ui()
        scripts.scripts_txt2img.setup_ui()
        scripts.scripts_current = scripts.scripts_img2img
        scripts.scripts_img2img.initialize_scripts(is_img2img=True)
        scripts.scripts_img2img.prepare_ui()
        scripts.scripts_img2img.setup_ui()
    scripts.scripts_current = None
    return demo
