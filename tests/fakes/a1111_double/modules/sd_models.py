"""Double of modules/sd_models.py: a registry of tiny checkpoints and model switching."""

from types import SimpleNamespace

from modules import lowvram, script_callbacks, shared

checkpoints: dict = {}  # title -> (info, factory)


def register(title, factory):
    info = SimpleNamespace(title=title, short_title=title, name=title)
    checkpoints[title] = (info, factory)
    return info


def checkpoint_tiles(use_short=False):
    return list(checkpoints)


def get_closet_checkpoint_match(title):
    entry = checkpoints.get(title)
    return entry[0] if entry else None


def reload_model_weights(sd_model=None, info=None):
    """A1111: ``info`` None loads the checkpoint the option ``sd_model_checkpoint`` names (when it is registered);
    a given ``info`` stands for the UI's checkpoint choice, which sets the option first."""
    if info is None:
        info = get_closet_checkpoint_match(getattr(shared.opts, "sd_model_checkpoint", None))
    elif info.title in checkpoints:
        shared.opts.sd_model_checkpoint = info.title
    if info is None or getattr(shared.sd_model, "sd_checkpoint_info", None) == info:
        return shared.sd_model
    if getattr(shared.sd_model, "lowvram", False):
        lowvram.send_everything_to_cpu()
    model = checkpoints[info.title][1]()
    lowvram.apply(model)  # --medvram / --lowvram: the model's pieces take turns on the GPU
    model.sd_checkpoint_info = info
    shared.sd_model = model
    script_callbacks.model_loaded_callback(model)
    return model


class SkipWritingToConfig:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
