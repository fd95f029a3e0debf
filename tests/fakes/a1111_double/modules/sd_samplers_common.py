"""Double of modules/sd_samplers_common.py."""

import torch
from modules import shared


class InterruptedException(BaseException):
    pass


def apply_refiner(cfg_denoiser, sigma=None):
    """Switches to ``p.refiner_checkpoint_info`` once ``refiner_switch_at`` of the steps are done."""
    p = cfg_denoiser.p
    info = getattr(p, "refiner_checkpoint_info", None)
    switch_at = getattr(p, "refiner_switch_at", None)
    if info is None or switch_at is None:
        return False
    if cfg_denoiser.step / cfg_denoiser.total_steps < switch_at:
        return False
    if shared.sd_model.sd_checkpoint_info == info:
        return False
    from modules import sd_models

    sd_models.reload_model_weights(info=info)
    p.setup_conds()
    cfg_denoiser.update_inner_model()
    return True


def samples_to_images_tensor(sample, approximation=None, model=None):
    """latent -> image [-1, 1]: approximation 2 ("Approx cheap") is the linear preview, else the full VAE."""
    if approximation == 2:
        from modules import sd_vae_approx

        return sd_vae_approx.cheap_approximation(sample)
    if model is None:
        model = shared.sd_model
    return model.decode_first_stage(sample)


def images_tensor_to_samples(image, approximation=None, model=None):
    """image [0, 1] -> latent, as A1111 1.10 does with the full VAE (one image at a time)."""
    if model is None:
        model = shared.sd_model
    image = image.to(model.device if hasattr(model, "device") else image.device, dtype=model.dtype) * 2 - 1
    return torch.stack([model.get_first_stage_encoding(model.encode_first_stage(img[None]))[0] for img in image])


def store_latent(x):
    pass


class Sampler:
    def __init__(self, funcname):
        self.funcname = funcname
        self.model_wrap_cfg = None
        self.last_latent = None
        self.sampler_extra_args = {}
        self.p = None

    def initialize(self, p):
        self.p = p
        den = self.model_wrap_cfg
        den.p = p
        den.mask = getattr(p, "mask", None)
        den.nmask = getattr(p, "nmask", None)
        den.init_latent = None
        den.step = 0
        den.image_cfg_scale = getattr(p, "image_cfg_scale", None)
        return {}

    def callback_state(self, d):
        shared.state.sampling_step = d["i"]
        if shared.state.interrupt_at_step is not None and d["i"] + 1 >= shared.state.interrupt_at_step:
            shared.state.interrupted = True

    def launch_sampling(self, steps, func):
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent
