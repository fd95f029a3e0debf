"""Memory bookkeeping of the double.

``free_memory_bytes`` is what ``get_free_memory`` reports; tests lower it to make
``calc_cond_uncond_batch`` split cond/uncond chunks into several model calls, as Forge does on a small GPU.
"""

from __future__ import annotations

import torch

free_memory_bytes: float = float(1 << 40)
signal_empty_cache = False


def get_free_memory(device=None, torch_free_too=False):
    return (free_memory_bytes, free_memory_bytes) if torch_free_too else free_memory_bytes


def module_size(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def soft_empty_cache(force=False):
    return None


def get_torch_device():
    return torch.device("cpu")


def xformers_enabled():
    return False


def unload_all_models():
    return None


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    for m in models:
        if hasattr(m, "forge_patch_model"):
            m.forge_patch_model()


def load_model_gpu(model):
    return load_models_gpu([model])
