"""``modules.sd_models`` (Forge 2.x): checkpoints of tiny models and ``forge_model_reload``.

Registered checkpoints (title -> kind, weight seed): ``tiny-sd1.safetensors`` (sd1, 0),
``tiny-sd1-alt.safetensors`` (sd1, 1; a second SD1 model for hires-checkpoint switches),
``tiny-sd2.safetensors``, ``tiny-sdxl.safetensors`` and ``tiny-flux.safetensors`` (a Flux-like model
without UNet).  ``forge_model_reload`` loads the model named by ``model_data.forge_loading_parameters``
when it changed (new engine object, fresh ``forge_objects``) and fires ``on_model_loaded``;
``load_model`` / ``reload_model_weights`` are stubs in Forge 2.x.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from modules import script_callbacks, shared

model_factory = None  # callable(kind, seed) -> TinySD; set by tests.fakes.forge_env
inference_weights = False  # True: parameters become inference tensors, like Forge's @inference_mode loader
_tiny_cache: dict = {}


class CheckpointInfo:
    def __init__(self, title, kind, seed=0):
        self.filename = f"/models/Stable-diffusion/{title}"
        self.title = title
        self.name = title
        self.name_for_extra = title.rsplit(".", 1)[0]
        self.model_name = self.name_for_extra
        self.short_title = self.name_for_extra
        self.hash = None
        self.sha256 = None
        self.shorthash = None
        self.ids = [title, self.name_for_extra]
        self.kind = kind
        self.seed = seed

    def calculate_shorthash(self):
        return self.shorthash

    def __repr__(self):
        return f"CheckpointInfo({self.title!r})"


checkpoints_list: dict = {}
checkpoint_aliases: dict = {}


def register_checkpoint(title, kind, seed=0):
    info = CheckpointInfo(title, kind, seed)
    checkpoints_list[title] = info
    for alias in info.ids:
        checkpoint_aliases[alias] = info
    return info


for _title, _kind, _seed in (
    ("tiny-sd1.safetensors", "sd1", 0),
    ("tiny-sd1-alt.safetensors", "sd1", 1),
    ("tiny-sd2.safetensors", "sd2", 0),
    ("tiny-sdxl.safetensors", "sdxl", 0),
    ("tiny-flux.safetensors", "flux", 0),
):
    register_checkpoint(_title, _kind, _seed)


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string)
    if info is not None:
        return info
    found = sorted((x for x in checkpoints_list.values() if search_string in x.title), key=lambda x: len(x.title))
    return found[0] if found else None


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False
        self.forge_loading_parameters = {}
        self.forge_hash = ""

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):
        self.sd_model = v


model_data = SdModelData()


@contextlib.contextmanager
def SkipWritingToConfig():
    yield


def _make_tiny(kind, seed):
    key = (kind, seed)
    if key not in _tiny_cache:
        factory = model_factory
        if factory is None:
            from tests.support.tiny import make_sd_model as factory
        # a private copy: the Forge loader switches module classes in place, and the factory may cache
        _tiny_cache[key] = copy.deepcopy(factory(kind, seed=seed))
    return _tiny_cache[key]


def _to_inference_tensors(module):
    with torch.inference_mode():
        for prm in module.parameters():
            prm.data = prm.data.clone()
        for name, buf in list(module.named_buffers()):
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            setattr(owner, name.rsplit(".", 1)[-1], buf.clone())


def forge_loader(checkpoint_info):
    from backend.diffusion_engine.tiny import TinyFluxEngine, TinyUNetEngine

    if checkpoint_info.kind == "flux":
        engine = TinyFluxEngine(checkpoint_info, seed=checkpoint_info.seed)
    else:
        engine = TinyUNetEngine(_make_tiny(checkpoint_info.kind, checkpoint_info.seed), checkpoint_info)
    if inference_weights:
        _to_inference_tensors(engine.forge_objects.unet.model)
    return engine


def forge_model_reload():
    current_hash = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current_hash and model_data.sd_model is not None:
        return model_data.sd_model, False
    checkpoint_info = model_data.forge_loading_parameters.get("checkpoint_info")
    if checkpoint_info is None:
        raise ValueError("You do not have any model! Please download at least one model in [models/Stable-diffusion].")
    model_data.sd_model = None
    sd_model = forge_loader(checkpoint_info)
    sd_model.extra_generation_params = {}
    sd_model.comments = []
    sd_model.sd_checkpoint_info = checkpoint_info
    sd_model.filename = checkpoint_info.filename
    model_data.set_sd_model(sd_model)
    script_callbacks.model_loaded_callback(sd_model)
    model_data.forge_hash = current_hash
    return sd_model, True


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    pass


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    pass


def unload_model_weights(sd_model=None, info=None):
    pass


def apply_token_merging(sd_model, token_merging_ratio):
    pass


def select_checkpoint():
    return get_closet_checkpoint_match(shared.opts.sd_model_checkpoint)


def load_checkpoint(title):
    """Double helper: select ``title`` like the checkpoint dropdown and load it now."""
    from modules_forge import main_entry

    main_entry.checkpoint_change(title)
    main_entry.refresh_model_loading_parameters()
    return forge_model_reload()[0]


def load_unsupported():
    """Double helper: switch to the Flux-like model (no UNet attention layers)."""
    return load_checkpoint("tiny-flux.safetensors")
