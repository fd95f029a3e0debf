"""The edit mask's final pass with an inpainting checkpoint (``edit_mask.inpaint_model``), as the paper's pipeline
re-renders: each image is the host's own img2img inpainting of the init image inside the final mask at full
strength with that checkpoint, the WebUI switching to it and back.  Checked against the same inpainting request
made directly, on the A1111 double with a registered tiny inpainting checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.edit_mask.test_edit_mask import BASE, edit_args
from tests.fakes.a1111_double import a1111_host
from tests.support.helpers import SCRIPT, assert_no_leftovers
from tests.support.images import photo
from tests.support.tiny import make_sd_model

MODELS = {"tiny-inpainting": lambda: make_sd_model("sd1", inpainting=True)}


def test_final_pass_renders_with_the_inpainting_checkpoint_and_switches_back():
    init = photo("cheetah1.jpg").resize((96, 80))
    kw = dict(BASE, init_images=[init], batch_size=2, n_iter=2)
    with a1111_host("sd1", models=MODELS) as h:
        h.load_script(SCRIPT)
        sd_models, shared = h.modules.sd_models, h.modules.shared
        args = edit_args(blur=0, grow=0, final="inpaint", inpaint_model="tiny-inpainting", show=True)
        out = h.img2img(**kw, script_args=args)
        assert not h.errors
        # switched back: the generation's checkpoint loaded and selected again
        assert shared.sd_model.sd_checkpoint_info.title == "sd1" and shared.opts.sd_model_checkpoint == "sd1"
        assert "Edit mask inpaint model: tiny-inpainting" in out.infotexts[0]
        images, masks = out.images[:4], out.images[4:]
        assert len(masks) == 4 and all(m.mode == "L" for m in masks)
        # the same request made directly: init image, the returned mask, full strength, the inpainting checkpoint
        p = h.modules.processing
        for i in (0, 3):
            q = p.StableDiffusionProcessingImg2Img(
                prompt=BASE["prompt"], negative_prompt="", seed=BASE["seed"] + i, sampler_name="Euler",
                steps=BASE["steps"], cfg_scale=BASE["cfg_scale"], width=96, height=80, init_images=[init],
                mask=masks[i], mask_blur=0, denoising_strength=1.0,
                override_settings={"sd_model_checkpoint": "tiny-inpainting"})
            q.scripts = None
            direct = p.process_images(q).images[0]
            sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match("sd1"))
            assert np.array_equal(np.asarray(direct), np.asarray(images[i])), i
        # without the checkpoint the final pass is the in-place one (the loaded model, the generation's strength)
        blend = h.img2img(**kw, script_args=edit_args(blur=0, grow=0, final="blend"))
        assert not np.array_equal(np.asarray(blend.images[0]), np.asarray(images[0]))
        assert_no_leftovers(h)


def test_the_second_batch_samples_with_the_generations_own_model():
    """A1111 leaves an override's model loaded; the final pass loads the generation's model back at once, so the
    next batch (n_iter 2) and the next generation sample with it."""
    init = photo("cheetah1.jpg").resize((96, 80))
    with a1111_host("sd1", models=MODELS) as h:
        h.load_script(SCRIPT)
        channels = []
        original = h.modules.processing.StableDiffusionProcessingImg2Img.sample

        def sample(self, *a, **k):
            channels.append(self.sd_model.model.diffusion_model.input_blocks[0][0].in_channels)
            return original(self, *a, **k)

        h.modules.processing.StableDiffusionProcessingImg2Img.sample = sample
        try:
            h.img2img(**dict(BASE, init_images=[init], n_iter=2),
                      script_args=edit_args(final="inpaint", inpaint_model="tiny-inpainting"))
        finally:
            h.modules.processing.StableDiffusionProcessingImg2Img.sample = original
        assert not h.errors
    # batch 1 (4 channels), its final pass (9), batch 2 (4), its final pass (9)
    assert channels == [4, 9, 4, 9]


@pytest.mark.parametrize("name", ["no-such-model", "sd1.5-inpainting"])
def test_an_unknown_checkpoint_is_refused_naming_the_field(name):
    init = photo("cheetah1.jpg").resize((96, 80))
    with a1111_host("sd1", models=MODELS) as h:
        h.load_script(SCRIPT)
        with pytest.raises(Exception, match=r"\(edit_mask\.inpaint_model\).*no checkpoint named"):
            h.img2img(**dict(BASE, init_images=[init]), script_args=edit_args(final="inpaint", inpaint_model=name))
        assert h.modules.shared.sd_model.model.diffusion_model.input_blocks[0][0].in_channels == 4
        ok = h.img2img(**dict(BASE, init_images=[init]), script_args=edit_args(final="blend", inpaint_model=name))
        assert ok.images  # with blend the field is not used
        assert_no_leftovers(h)


def test_the_ui_offers_the_checkpoint_list():
    """A dropdown of the WebUI's checkpoints (and empty: the loaded model) that also takes a typed name."""
    import gradio as gr

    from lib_attn import settings as S
    from lib_attn import ui

    with a1111_host("sd1", models=MODELS):
        with gr.Blocks():
            parts = ui.build(True, lambda name: f"script_img2img_attention_toolkit_{name}")
        comp = next(c for f, c in zip(S.FIELDS, parts.components, strict=True) if f.key == "edit_mask_inpaint_model")
    assert isinstance(comp, gr.Dropdown)
    choices = [c[0] if isinstance(c, (tuple, list)) else c for c in comp.choices]
    assert "tiny-inpainting" in choices and "sd1" in choices and "" in choices and comp.value == ""
    assert torch.is_grad_enabled()
