"""``modules_forge.main_entry``: checkpoint selection feeding ``sd_models.forge_model_reload``."""

from __future__ import annotations

from modules import sd_models, shared


def refresh_model_loading_parameters():
    info = sd_models.get_closet_checkpoint_match(shared.opts.sd_model_checkpoint)
    sd_models.model_data.forge_loading_parameters = {
        "checkpoint_info": info,
        "additional_modules": list(shared.opts.forge_additional_modules),
        "unet_storage_dtype": None,
    }


def checkpoint_change(ckpt_name: str, save=True, refresh=True):
    info = sd_models.get_closet_checkpoint_match(ckpt_name)
    new_title = info.title if info is not None else ckpt_name
    if new_title == shared.opts.sd_model_checkpoint:
        return False
    shared.opts.set("sd_model_checkpoint", new_title)
    if refresh:
        refresh_model_loading_parameters()
    return True


def modules_change(module_values, save=True, refresh=True):
    return False
