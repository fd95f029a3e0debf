"""``modules.shared``: ``opts``, ``state``, ``cmd_opts`` and ``sd_model`` (a property reading
``modules.sd_models.model_data``, as in the WebUI)."""

from __future__ import annotations

import sys
import types

from modules import options
from modules.options import OptionHTML, OptionInfo, options_section  # noqa: F401

OPTION_DEFAULTS = {
    # sampling
    "batch_cond_uncond": True,
    "skip_early_cond": 0.0,
    "s_min_uncond": 0.0,
    "s_min_uncond_all": False,
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": 0.0,
    "s_noise": 1.0,
    "eta_ancestral": 1.0,
    "eta_ddim": 0.0,
    "eta_noise_seed_delta": 0,
    "randn_source": "GPU",
    "forge_try_reproduce": "None",
    "always_discard_next_to_last_sigma": False,
    "use_old_karras_scheduler_sigmas": False,
    "sigma_min": 0.0,
    "sigma_max": 0.0,
    "rho": 0.0,
    "sgm_noise_multiplier": False,
    "sd_noise_schedule": "Default",
    "use_old_scheduling": False,
    "CLIP_stop_at_last_layers": 1,
    "persistent_cond_cache": True,
    "hires_fix_use_firstpass_conds": False,
    "hires_fix_refiner_pass": "second pass",
    "token_merging_ratio": 0.0,
    "token_merging_ratio_img2img": 0.0,
    "token_merging_ratio_hr": 0.0,
    "emphasis": "Original",
    "sdxl_crop_left": 0,
    "sdxl_crop_top": 0,
    "fp8_storage": "Disable",
    "cache_fp16_weight": False,
    # img2img
    "img2img_extra_noise": 0.0,
    "img2img_fix_steps": False,
    "initial_noise_multiplier": 1.0,
    "inpainting_mask_weight": 1.0,
    "img2img_background_color": "#ffffff",
    "img2img_color_correction": False,
    "overlay_inpaint": True,
    "return_mask": False,
    "return_mask_composite": False,
    "save_mask": False,
    "save_mask_composite": False,
    # vae / output
    "sd_vae_decode_method": "Full",
    "sd_vae_encode_method": "Full",
    "samples_save": False,
    "grid_save": False,
    "return_grid": True,
    "grid_only_if_multiple": True,
    "enable_pnginfo": True,
    "samples_format": "png",
    "live_previews_enable": False,
    "show_progress_every_n_steps": 10,
    "add_model_hash_to_info": True,
    "add_model_name_to_info": True,
    "add_version_to_infotext": True,
    "face_restoration": False,
    "tiling": False,
    # model
    "sd_model_checkpoint": "tiny-sd1.safetensors",
    "forge_additional_modules": [],
    # api
    "api_enable_requests": False,
    "api_forbid_local_requests": True,
    "api_useragent": "",
    "outdir_txt2img_samples": "outputs/txt2img-images",
    "outdir_img2img_samples": "outputs/img2img-images",
    "outdir_txt2img_grids": "outputs/txt2img-grids",
    "outdir_img2img_grids": "outputs/img2img-grids",
}

options_templates = {k: OptionInfo(v) for k, v in OPTION_DEFAULTS.items()}
opts = options.Options(options_templates)
restricted_opts: set = set()

cmd_opts = types.SimpleNamespace(
    api=True,
    nowebui=False,
    no_half=True,
    lowvram=False,
    medvram=False,
    embeddings_dir="",
    no_prompt_history=True,
    ui_settings_file="config.json",
    disable_extension_access=False,
)
device = "cpu"
parallel_processing_allowed = True
demo = None
settings_components: dict = {}
latent_upscale_default_mode = "Latent"
latent_upscale_modes = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}


class _Upscaler:
    def __init__(self, name):
        self.name = name


sd_upscalers = [_Upscaler("None"), _Upscaler("Lanczos"), _Upscaler("Nearest")]


class State:
    def __init__(self):
        self.reset()

    def reset(self):
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.job = ""
        self.job_no = 0
        self.job_count = 0
        self.processing_has_refined_job_count = False
        self.sampling_step = 0
        self.sampling_steps = 0
        self.current_latent = None
        self.current_image = None
        self.textinfo = None

    def interrupt(self):
        self.interrupted = True

    def skip(self):
        self.skipped = True

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0

    def begin(self, job="(unknown)"):
        self.reset()
        self.job = job
        self.job_count = -1

    def end(self):
        self.job = ""
        self.job_count = 0

    def assign_current_image(self, image):
        self.current_image = image


state = State()


class _TotalTQDM:
    def update(self):
        pass

    def updateTotal(self, new_total):
        pass

    def clear(self):
        pass


total_tqdm = _TotalTQDM()


class _PromptStyles:
    def apply_styles_to_prompt(self, prompt, styles):
        return prompt

    def apply_negative_styles_to_prompt(self, prompt, styles):
        return prompt


prompt_styles = _PromptStyles()


class _Shared(types.ModuleType):
    @property
    def sd_model(self):
        from modules import sd_models

        return sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        from modules import sd_models

        sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = _Shared
