"""Forge adapter (Forge 2.x ``backend/``; Forge-old / reForge ``ldm_patched`` where the same calls exist).

Forge resets ``p.sd_model.forge_objects`` before every sampling pass and then calls
``process_before_every_sampling``; there we clone ``forge_objects.unet``, register a post-CFG
function on the clone and assign it back, so the patch lives exactly as long as the pass.

PAG: the post-CFG function runs one extra ``calc_cond_uncond_batch`` on the cond rows only, with
an ``attn1`` replace patch (identity attention: the output is ``v``) on the selected
``(block, number, index)`` keys in a copy of ``model_options``, and returns
``denoised + s * (cond_denoised - perturbed)``.  It also runs when Forge skips the uncond
(CFG 1, hires ``hr_cfg`` 1, skip_early_cond), where ``denoised`` is the cond prediction.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Any

from modules import script_callbacks

from lib_attn.registry import clean_leftovers
from lib_attn.session import Session, attach, check_settings_against, get, layer_keys, plan_pass
from lib_attn.settings import FIELD_BY_KEY, Settings, SettingsError

log = logging.getLogger("lib_attn")

_CLONE_MARK = "_attn_toolkit_session"


def _calc_cond_uncond_batch():
    for name in ("backend.sampling.sampling_function", "ldm_patched.modules.samplers"):
        with contextlib.suppress(ImportError):
            mod = importlib.import_module(name)
            if hasattr(mod, "calc_cond_uncond_batch"):
                return mod.calc_cond_uncond_batch
    raise SettingsError("host", "Host", "this Forge build has no calc_cond_uncond_batch; PAG cannot run")


def _timestep(model: Any, sigma: Any) -> float | None:
    for owner in ("predictor", "model_sampling"):
        obj = getattr(model, owner, None)
        if obj is not None and hasattr(obj, "timestep"):
            return float(obj.timestep(sigma[:1])[0])
    return None


def _with_attn1_replace(model_options: dict, patch: Any, keys: list[tuple[str, int, int]]) -> dict:
    """Copy of ``model_options`` with ``patches_replace['attn1'][key] = patch`` (copy-on-write)."""
    out = dict(model_options)
    to = dict(out.get("transformer_options", {}))
    pr = dict(to.get("patches_replace", {}))
    attn1 = dict(pr.get("attn1", {}))
    for k in keys:
        attn1[k] = patch
    pr["attn1"] = attn1
    to["patches_replace"] = pr
    out["transformer_options"] = to
    return out


def _identity_attention(q: Any, k: Any, v: Any, extra_options: Any = None, **kwargs: Any) -> Any:
    """attn1 replace patch: the identity attention map gives every token its own value."""
    return v


class ForgeSession(Session):
    def __init__(self, p: Any, settings: Settings):
        super().__init__(settings)
        self.p = p

    @contextlib.contextmanager
    def sampling(self):
        unet = _diffusion_model(self.p)
        if unet is None:
            raise _unsupported_error(self.p)
        clean_leftovers(unet)
        check_settings_against(unet, self.settings)
        script_callbacks.on_cfg_denoiser(self.on_cfg_denoiser)
        try:
            yield self
        finally:
            script_callbacks.remove_callbacks_for_function(self.on_cfg_denoiser)
            self.end_pass()

    def on_cfg_denoiser(self, params: Any) -> None:
        self.step, self.total_steps = params.sampling_step, params.total_sampling_steps

    def patch_unet(self, p: Any) -> None:
        """Called from ``process_before_every_sampling``: patch a clone of ``forge_objects.unet``."""
        fo = p.sd_model.forge_objects
        if getattr(fo.unet, _CLONE_MARK, None) is self:
            return  # already patched for this pass (Forge calls the hook twice in the hires pass)
        unet_module = getattr(fo.unet.model, "diffusion_model", None)
        if unet_module is None:
            self.fail(_unsupported_error(p))
            return
        is_hr = bool(getattr(p, "is_hr_pass", False))
        try:
            self.plan = plan_pass(self.settings, is_hr, layer_keys(unet_module))
        except SettingsError as e:
            self.fail(e)
            return
        if not self.plan.any:
            return
        clone = fo.unet.clone()
        setattr(clone, _CLONE_MARK, self)
        clone.set_model_sampler_post_cfg_function(self._post_cfg)
        fo.unet = clone

    def _post_cfg(self, args: dict) -> Any:
        denoised = args["denoised"]
        plan = self.plan.pag if self.plan else None
        if plan is None:
            return denoised
        model, sigma = args["model"], args["sigma"]
        scale = plan.scale_at(self.step, self.total_steps, _timestep(model, sigma))
        if scale <= 0:
            return denoised
        options = _with_attn1_replace(args["model_options"], _identity_attention, [k.forge_key for k in plan.layers])
        calc = _calc_cond_uncond_batch()
        perturbed, _ = calc(model, args["cond"], None, args["input"], sigma, options)
        return denoised + (args["cond_denoised"] - perturbed) * scale


def _diffusion_model(p: Any) -> Any:
    fo = getattr(p.sd_model, "forge_objects", None)
    unet = getattr(fo, "unet", None)
    return getattr(getattr(unet, "model", None), "diffusion_model", None)


def _unsupported_error(p: Any) -> SettingsError:
    name = type(getattr(p, "sd_model", None)).__name__
    return SettingsError(
        "model", "Model", f"the loaded model ({name}) has no UNet; the toolkit supports SD1.x, SD2.x and SDXL"
    )


# ---- entry points used by the Script ----------------------------------------------------------
def begin(p: Any, settings: Settings) -> None:
    if settings.colorize.enabled:
        raise FIELD_BY_KEY["colorize_enabled"].error(
            "reference colorization is not available on Forge yet (A1111 only)"
        )
    attach(p, ForgeSession(p, settings))


def before_every_sampling(p: Any) -> None:
    session = get(p)
    if isinstance(session, ForgeSession):
        session.patch_unet(p)


def cleanup_model() -> int:
    return 0  # Forge patches live on clones that the host discards
