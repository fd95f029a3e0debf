"""``backend.modules.k_model.KModel``: ``forge_objects.unet.model`` (``.diffusion_model``, ``.predictor``).

``apply_model(x, sigma, **c)`` scales the input, converts sigma to Forge's discrete timestep, calls the
diffusion model with ``transformer_options`` and returns the denoised prediction.  Every call is also
reported to the functions in ``apply_model_listeners`` (used by tests to count UNet calls and rows).
"""

from __future__ import annotations

import torch
from backend import memory_management

apply_model_listeners: list = []


class KModel(torch.nn.Module):
    def __init__(self, model, diffusers_scheduler=None, k_predictor=None, config=None):
        super().__init__()
        self.config = config
        self.storage_dtype = getattr(model, "storage_dtype", torch.float32)
        self.computation_dtype = getattr(model, "computation_dtype", torch.float32)
        self.diffusion_model = model
        if k_predictor is None:
            raise ValueError("the double needs an explicit k_predictor")
        self.predictor = k_predictor

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        if transformer_options is None:
            transformer_options = {}
        for listener in apply_model_listeners:
            listener(x, t, transformer_options)
        sigma = t
        xc = self.predictor.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        dtype = self.computation_dtype
        xc = xc.to(dtype)
        timestep = self.predictor.timestep(t).float()
        context = c_crossattn.to(dtype) if c_crossattn is not None else None
        extra = {}
        for name, value in kwargs.items():
            if hasattr(value, "dtype") and value.dtype not in (torch.int, torch.long):
                value = value.to(dtype)
            extra[name] = value
        out = self.diffusion_model(
            xc, timestep, context=context, control=control, transformer_options=transformer_options, **extra
        ).float()
        return self.predictor.calculate_denoised(sigma, out, x)

    def memory_required(self, input_shape):
        area = input_shape[0] * input_shape[2] * input_shape[3]
        return 1.28 * area * memory_management.dtype_size(self.computation_dtype) * 16384

    def get_dtype(self):
        return self.computation_dtype
