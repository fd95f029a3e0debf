"""A small WebUI page for the browser tests in CI: the toolkit's real UI (``lib_attn/ui.py`` through the script's
``ui()``), the real ``javascript/`` and ``style.css``, and the A1111 double behind the buttons.

It stands for the parts of A1111 1.10's page that the toolkit meets, with A1111's element ids, so that the same
tests run here and against a real WebUI:

* ``#tabs`` with ``txt2img`` and ``img2img`` tabs; per tab the prompt box ``#<tab>_prompt``, the paste button
  ``#paste`` inside ``#<tab>_tools``, ``#<tab>_generate``, the gallery ``#<tab>_gallery``, the infotext under the
  image ``#html_info_<tab>`` and the error area ``#html_log_<tab>``; img2img's input image ``#img2img_image``;
  txt2img's "send to img2img" button ``#txt2img_send_to_img2img``;
* the script runner's ``setup_ui()`` builds every AlwaysOn script's controls in each tab, as ``modules/ui.py`` does;
* Generate runs ``process_images`` of the double with the tab's script args and shows the first infotext as
  ``plaintext_to_html`` does; an exception shows as ``<div class='error'>Type: message</div>`` in the log area,
  as ``call_queue.wrap_gradio_call`` does, and the page keeps working;
* ↙ pastes the prompt box's text through the double's ``connect_paste`` (the WebUI's paste, with the
  ``infotext_pasted`` callbacks); "send to img2img" copies the controls named in ``paste_field_names`` from
  txt2img to img2img (``connect_paste_params_buttons``) and selects the img2img tab (the image is not sent); the
  button is announced to the ``after_component`` callbacks when it is made, as the WebUI does for every component;
* the head holds ``webui_shim.js`` (standing for the WebUI's ``script.js``: ``gradioApp``, ``onUiLoaded``,
  ``onAfterUiUpdate``), then every file of ``javascript/``, as the WebUI's ``ui_gradio_extensions`` does (inline
  here rather than by ``file=`` URL); ``style.css`` is the page's CSS, as the WebUI appends extension styles.
"""

from __future__ import annotations

import html
import pathlib
import socket
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[2]
TABS = ("txt2img", "img2img")
GEN = {"steps": 3, "width": 64, "height": 64, "cfg_scale": 5.0, "seed": 1, "sampler_name": "Euler"}


def head() -> str:
    files = [pathlib.Path(__file__).with_name("webui_shim.js"), *sorted((ROOT / "javascript").glob("*.js"))]
    return "\n".join(f"<script>\n{f.read_text(encoding='utf-8')}\n</script>" for f in files)


def plaintext_to_html(text: str) -> str:
    return "<p>" + "<br>\n".join(html.escape(x) for x in text.split("\n")) + "</p>"


def build(host):
    """The page's Blocks; ``host`` is an ``a1111_host`` harness with the toolkit's script loaded."""
    import gradio as gr

    from tests.fakes.common.paste import send_to_pairs

    m = host.modules
    paste_fields: dict[str, list] = {}
    with gr.Blocks(css=(ROOT / "style.css").read_text(encoding="utf-8"), head=head(), analytics_enabled=False,
                   title="Stable Diffusion") as demo:
        with gr.Tabs(elem_id="tabs") as tabs:
            for tab in TABS:
                is_img2img = tab == "img2img"
                runner = host.runners[is_img2img]
                with gr.Tab(tab, id=tab, elem_id=f"tab_{tab}"):
                    prompt = gr.Textbox(label="Prompt", show_label=False, lines=3, elem_id=f"{tab}_prompt")
                    with gr.Row(elem_id=f"{tab}_tools"):
                        paste = gr.Button("↙", elem_id="paste")
                        generate = gr.Button("Generate", elem_id=f"{tab}_generate", variant="primary")
                    with gr.Row():
                        with gr.Column():
                            init = None
                            if is_img2img:
                                init = gr.Image(label="Image", sources=["upload"], type="pil", elem_id="img2img_image")
                            runner.infotext_fields, runner.paste_field_names = [], []
                            runner.prepare_ui()
                            inputs = runner.setup_ui()
                        with gr.Column():
                            gallery = gr.Gallery(label="Output", elem_id=f"{tab}_gallery", columns=2)
                            send = None
                            if not is_img2img:
                                send = gr.Button("🖼️", elem_id="txt2img_send_to_img2img")
                                # what the WebUI's patched component __init__ does for every component
                                m.script_callbacks.after_component_callback(send, elem_id="txt2img_send_to_img2img")
                            info = gr.HTML(elem_id=f"html_info_{tab}", elem_classes="infotext")
                            log = gr.HTML(elem_id=f"html_log_{tab}")
                paste_fields[tab] = [(prompt, "Prompt"), *runner.infotext_fields]
                m.infotext_utils.connect_paste(paste, paste_fields[tab], prompt)
                first = [prompt, init] if is_img2img else [prompt]
                generate.click(fn=_generator(host, is_img2img), inputs=first + list(inputs),
                               outputs=[gallery, info, log])
                if send is not None:
                    send_button = send
        src, dst = send_to_pairs(paste_fields["txt2img"], paste_fields["img2img"],
                                 host.runners[False].paste_field_names)
        send_button.click(fn=lambda *v: v if len(v) != 1 else v[0], inputs=src, outputs=dst).then(
            fn=lambda: gr.Tabs(selected="img2img"), outputs=tabs)
    return demo


def _generator(host, is_img2img: bool):
    m = host.modules

    def generate(prompt, *rest):
        kw = dict(GEN, prompt=prompt or "")
        args = list(rest)
        if is_img2img:
            init, args = args[0], args[1:]
            if init is None:
                return None, "", "<div class='error'>ValueError: no input image</div>"
            kw.update(init_images=[init], denoising_strength=0.75)
            cls = m.processing.StableDiffusionProcessingImg2Img
        else:
            cls = m.processing.StableDiffusionProcessingTxt2Img
        try:
            p = cls(scripts=host.runners[is_img2img], script_args=args, **kw)
            processed = m.processing.process_images(p)
        except Exception as e:  # call_queue.wrap_gradio_call
            traceback.print_exc()
            return None, "", f"<div class='error'>{html.escape(f'{type(e).__name__}: {e}')}</div>"
        return processed.images, plaintext_to_html(processed.infotexts[0]), ""

    return generate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(demo) -> str:
    """Serve the page on a free loopback port (in this process's threads); returns its URL."""
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        show_api=False, share=False)
    return f"http://127.0.0.1:{port}"
