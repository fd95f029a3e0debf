"""Double of modules/lowvram.py (A1111 1.10): ``--medvram`` and ``--lowvram``.

As in A1111, ``setup_for_low_vram`` puts a forward pre-hook ``send_me_to_gpu`` on the modules that take turns on the
GPU, and only the last one that ran is there (``module_in_gpu``):

* the first stage (A1111 wraps ``first_stage_model.encode``/``decode``; here ``encode_first_stage`` and
  ``decode_first_stage``, whose stand-in VAE is the two convolutions) and the text encoder
  (``get_learned_conditioning`` here) always;
* ``--medvram``: ``sd_model.model`` (the DiffusionWrapper that ``apply_model`` calls) as one piece;
* ``--lowvram``: the UNet's ``time_embed``, each input block, the middle block and each output block apart; the rest
  of the UNet (``out``, ``label_emb``) stays on the GPU.

This double runs on the CPU, where A1111's moves do nothing, so it keeps the bookkeeping and checks it instead: a
UNet module whose weights would be on the CPU when it runs raises the error that a real GPU gives ("Expected all
tensors to be on the same device"), naming the module.  Code that calls the UNet or its parts around the hooks
(right after a VAE encode, say) fails here as it would fail for a ``--medvram`` user.
"""

from __future__ import annotations

import torch
from modules import devices, shared

module_in_gpu = None
cpu = torch.device("cpu")


def send_everything_to_cpu():
    global module_in_gpu
    if module_in_gpu is not None:
        module_in_gpu.to(cpu)
    module_in_gpu = None


def is_needed(sd_model):
    opts = shared.cmd_opts
    return opts.lowvram or opts.medvram or (opts.medvram_sdxl and getattr(sd_model, "is_sdxl", False))


def apply(sd_model):
    enable = is_needed(sd_model)
    shared.parallel_processing_allowed = not enable
    if enable:
        setup_for_low_vram(sd_model, not shared.cmd_opts.lowvram)
    else:
        sd_model.lowvram = False


def is_enabled(sd_model):
    return getattr(sd_model, "lowvram", False)


def setup_for_low_vram(sd_model, use_medvram):
    if getattr(sd_model, "lowvram", False):
        return
    sd_model.lowvram = True

    def send_me_to_gpu(module, _):
        global module_in_gpu
        if module_in_gpu is module:
            return
        if module_in_gpu is not None:
            module_in_gpu.to(cpu)
        module.to(devices.device)
        module_in_gpu = module

    # the stand-ins' first stage and text encoder, as the modules A1111 moves for them
    first_stage = torch.nn.ModuleList([sd_model.vae_enc, sd_model.vae_dec])
    text_encoder = torch.nn.Module()

    def on_gpu_first(module, method):
        def wrapper(*args, **kwargs):
            send_me_to_gpu(module, None)
            return method(*args, **kwargs)

        return wrapper

    sd_model.encode_first_stage = on_gpu_first(first_stage, sd_model.encode_first_stage)
    sd_model.decode_first_stage = on_gpu_first(first_stage, sd_model.decode_first_stage)
    sd_model.get_learned_conditioning = on_gpu_first(text_encoder, sd_model.get_learned_conditioning)

    unet = sd_model.model.diffusion_model
    if use_medvram:
        sd_model.model.register_forward_pre_hook(send_me_to_gpu)
        homes = {unet: sd_model.model}
    else:
        parts = [unet.time_embed, *unet.input_blocks, unet.middle_block, *unet.output_blocks]
        for part in parts:
            part.register_forward_pre_hook(send_me_to_gpu)
        homes = {part: part for part in parts}
    _check_placement(unet, homes)


def _check_placement(unet, homes):
    """A pre-hook on every UNet module with weights of its own: its home (the module ``send_me_to_gpu`` moves it
    with) must be the one on the GPU when it runs."""
    home_of = {}
    for top, home in homes.items():
        for name, m in top.named_modules():
            home_of[m] = (home, name)
    for m in unet.modules():
        if m in home_of and any(True for _ in m.parameters(recurse=False)):
            home, name = home_of[m]

            def check(module, _, home=home, name=name):
                if module_in_gpu is not home:
                    raise RuntimeError(
                        "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and "
                        f"cpu! (--medvram/--lowvram double: UNet module {name or type(module).__name__} ran while its "
                        "weights were on the CPU)"
                    )

            m.register_forward_pre_hook(check)
