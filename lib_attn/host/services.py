"""What the methods' run objects ask of the WebUI, in one place: VAE encoding and decoding, the models folder, the cheap latent
preview, the negative prompts' conditioning and the sampler's call count.  Each function imports the host's modules when called (A1111 and the
Forge family share these modules)."""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image


class HostServices:
    """Passed to every method's run object; tests may give a stand-in."""

    @staticmethod
    def encode(p: Any, images: torch.Tensor) -> torch.Tensor:
        """VAE-encode images (B, 3, H, W) in [0, 1] the way the host does for img2img."""
        from modules import sd_samplers_common

        return sd_samplers_common.images_tensor_to_samples(images, None, p.sd_model)

    @staticmethod
    def decode(p: Any, z: torch.Tensor) -> torch.Tensor:
        """VAE-decode latents with the full VAE the way the host does: images (B, 3, H, W) in [0, 1]."""
        from modules import sd_samplers_common

        with torch.no_grad():
            x = sd_samplers_common.samples_to_images_tensor(z, 0, p.sd_model)
        return ((x.float() + 1) / 2).clamp(0, 1)

    @staticmethod
    def find_checkpoint(name: str) -> str | None:
        """The title of the WebUI's checkpoint that ``name`` names (its title, name or hash, as the WebUI matches
        them), or None."""
        from modules import sd_models

        info = sd_models.get_closet_checkpoint_match(name)
        return None if info is None else str(info.title)

    @staticmethod
    def masked_img2img(p: Any, index: int, mask: Image.Image, checkpoint: str) -> Image.Image:
        """Image ``index`` of the batch in progress rendered again by the host's own img2img of the init image inside
        ``mask`` (white = regenerate; its masked-content default) at full strength with the checkpoint
        ``checkpoint`` (the WebUI switches to it through ``override_settings``, as for any request): the same
        prompt, seed, sampler, steps, CFG and size, no scripts.  The generation's own model is loaded back afterwards (A1111 leaves the override's
        loaded, Forge reloads lazily), so its next batch samples with it."""
        from modules import processing, sd_models, shared

        inits = list(getattr(p, "init_images", None) or [])
        pick = index if len(inits) > 1 else 0
        kw = dict(
            prompt=p.prompts[index],
            negative_prompt=p.negative_prompts[index],
            seed=int(p.seeds[index]),
            sampler_name=p.sampler_name,
            steps=int(p.steps),
            cfg_scale=float(p.cfg_scale),
            width=int(p.width),
            height=int(p.height),
            init_images=[inits[pick]],
            mask=mask,
            mask_blur=0,
            resize_mode=int(getattr(p, "resize_mode", 0) or 0),
            denoising_strength=1.0,
            batch_size=1,
            n_iter=1,
            do_not_save_samples=True,
            do_not_save_grid=True,
            override_settings={"sd_model_checkpoint": checkpoint},
            override_settings_restore_afterwards=True,
        )
        if getattr(p, "scheduler", None) is not None:
            kw["scheduler"] = p.scheduler
        q = processing.StableDiffusionProcessingImg2Img(**kw)
        q.scripts, q.script_args = None, []
        before = getattr(shared.sd_model, "sd_checkpoint_info", None)
        try:
            return processing.process_images(q).images[0]
        finally:
            if before is not None and getattr(shared.sd_model, "sd_checkpoint_info", None) is not before:
                if hasattr(sd_models, "forge_model_reload"):
                    sd_models.forge_model_reload()  # the option is back: Forge loads the generation's model again
                else:
                    sd_models.reload_model_weights(info=before)
                if "sd_model" in vars(p):  # Forge keeps the model on p
                    p.sd_model = shared.sd_model

    @staticmethod
    def models_dir(name: str) -> str:
        """``<WebUI models folder>/<name>``."""
        from modules import paths

        return os.path.join(paths.models_path, name)

    @staticmethod
    def latent_rgb(p: Any, z: torch.Tensor) -> torch.Tensor:
        """The host's cheap RGB preview of latents (approximation "Approx cheap": a linear map per latent pixel, no
        network), in [0, 1], (B, 3, h, w) at latent resolution."""
        from modules import sd_samplers_common

        with torch.no_grad():
            # float32: the hosts' coefficient tensors are float32 and einsum does not mix dtypes (fp16 init latents)
            rgb = sd_samplers_common.samples_to_images_tensor(z.float(), 2, getattr(p, "sd_model", None))
        return ((rgb.float() + 1) / 2).clamp(0, 1)

    @staticmethod
    def negative_conditioning(p: Any, hr: bool) -> Any:
        """The negative prompts' conditioning of a pass (one per image, scheduled for prompt editing), made as the host
        makes it; for where the host skipped it (Forge at CFG 1 makes none)."""
        from modules import prompt_parser

        negatives = (getattr(p, "hr_negative_prompts", None) if hr else None) or p.negative_prompts
        w, h = (
            (getattr(p, "hr_upscale_to_x", p.width), getattr(p, "hr_upscale_to_y", p.height))
            if hr
            else (p.width, p.height)
        )
        steps = int(getattr(p, "hr_second_pass_steps", 0) or p.steps) if hr else int(p.steps)
        texts = prompt_parser.SdConditioning(negatives, is_negative_prompt=True, width=w, height=h)
        return prompt_parser.get_learned_conditioning(p.sd_model, texts, steps)

    @staticmethod
    def conditioning_at(conds: Any, step: int) -> Any:
        """Scheduled conditioning at a step: a tensor (or SDXL dict) with one row per image."""
        from modules import prompt_parser

        return prompt_parser.reconstruct_cond_batch(conds, step)

    @staticmethod
    def pass_calls(den: Any) -> int:
        """Model calls the CFG denoiser ``den`` makes in this pass.  ``total_steps`` is the host's own count
        (``config.total_steps``: twice the steps for second-order samplers); two host habits are allowed for, so
        that full coverage comes no later than the last call: second-order samplers (Heun, DPM2, DPM++ SDE) evaluate
        once, not twice, at their last step (its next sigma is 0), and A1111's timestep samplers (DDIM/PLMS/UniPC,
        also in Forge) launch ``t_enc + 1`` steps in an img2img pass but loop ``len(timesteps) - 1 = t_enc - 1``
        times."""
        total = int(getattr(den, "total_steps", 0) or 0)
        sampler = getattr(den, "sampler", None)
        options = getattr(getattr(sampler, "config", None), "options", None) or {}
        if options.get("second_order"):
            total -= 1
        if type(sampler).__module__.rsplit(".", 1)[-1] == "sd_samplers_timesteps":
            total -= 2
        return max(total, 1)


SERVICES = HostServices()
