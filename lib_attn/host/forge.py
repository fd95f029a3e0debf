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

import torch
from modules import script_callbacks

from lib_attn import ops
from lib_attn.host.services import SERVICES
from lib_attn.methods.colorize import core as col
from lib_attn.methods.edit_mask import core as em
from lib_attn.methods.edit_mask import run as edit_mask_io
from lib_attn.methods.style import core as style
from lib_attn.methods.style import run as style_io
from lib_attn.methods.yoda import core as yd
from lib_attn.registry import clean_leftovers
from lib_attn.session import (
    Session,
    attach,
    check_settings_against,
    get,
    layer_keys,
    layer_widths,
    make_runs,
    plan_pass,
)
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


def _with_transformer_option(model_options: dict, key: str, value: Any) -> dict:
    out = dict(model_options)
    out["transformer_options"] = {**out.get("transformer_options", {}), key: value}
    return out


def _identity_attention(q: Any, k: Any, v: Any, extra_options: Any = None, **kwargs: Any) -> Any:
    """attn1 replace patch: the identity attention map gives every token its own value."""
    return v


_MODE = "attn_toolkit_colorize"  # transformer_options key: "capture" | "transfer" | absent (plain)


def _attention(q: Any, k: Any, v: Any, heads: int) -> Any:
    from backend.attention import attention_function

    return attention_function(q, k, v, heads)


class ForgeSession(Session):
    def __init__(self, p: Any, settings: Settings):
        super().__init__(settings)
        self.p = p
        self.runs = make_runs(p, settings, SERVICES)
        self.colorize = self.runs.get("colorize")
        self._feats: dict = {}  # colorize: forge key -> {stream: {source: (q, k, v)}}
        self._feats_sigma: float | None = None
        self._col_params: dict = {}
        self.style = self.runs.get("style")
        self.recorder = style.Recorder()
        self._style_keys: set = set()
        self.style_losses: list[list[float]] = []
        self.edit = self.runs.get("edit_mask")
        self._edit_seen: set = set()  # (step, layer) pairs whose maps are in: one call per step counts
        self._inpainting = False  # the edit mask's final inpainting pass runs unpatched
        self.yoda = self.runs.get("yoda")
        self._img2img = bool(getattr(p, "init_images", None))
        self._yoda_keys: set = set()
        self._yoda_seen: set = set()  # (step, layer) pairs whose saliency is in (the "unet" source)
        self._yoda_at: tuple | None = None  # (model call, calls in the pass) of the step in progress

    @contextlib.contextmanager
    def sampling(self):
        unet = _diffusion_model(self.p)
        if unet is None:
            raise _unsupported_error(self.p)
        clean_leftovers(unet)
        plans = check_settings_against(unet, self.settings, img2img=self._img2img)
        if self.settings.style.checkpointing == "on" and any(plan.style is not None for plan in plans):
            # Forge's blocks add in place: recomputed activations would be overwritten (wrong gradients)
            raise FIELD_BY_KEY["style_checkpointing"].error(
                "gradient checkpointing is not available on Forge (its transformer blocks add in place, "
                "which makes recomputed gradients wrong); use auto or off"
            )
        if self.colorize is not None:
            self.colorize.encode(self.p, SERVICES.encode)
        if self.style is not None:
            self.style.begin(self.p)
        if self.edit is not None:
            self._count_tokens = edit_mask_io.token_counter(self.p.sd_model)
            self.edit.begin_batch()
        on_cfg_denoiser = self.guarded(self.on_cfg_denoiser)
        script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
        try:
            yield self
            if self.edit is not None and self.error is None:
                self.edit.finish_batch((int(self.p.width), int(self.p.height)), self.fail)
            if self.yoda is not None and self.error is None:
                self.yoda.finish_pass(self.fail)
        finally:
            script_callbacks.remove_callbacks_for_function(on_cfg_denoiser)
            if self.yoda is not None:
                self.yoda.begin_pass(None)
            self.end_pass()

    @contextlib.contextmanager
    def follow_up(self):
        """Edit mask with the inpainting final pass: the host samples once more with fresh, unpatched
        ``forge_objects`` (as Forge sets them before a pass) and the final masks."""
        run = self.edit
        if run is None or run.settings.final != "inpaint" or run.final is None or self.error is not None:
            yield False
            return
        sd_model = self.p.sd_model
        fresh = getattr(sd_model, "forge_objects_after_applying_lora", None)
        if fresh is not None:
            sd_model.forge_objects = fresh.shallow_copy()
        self._inpainting = True
        try:
            with run.inpainting(self.p):
                yield True
        finally:
            self._inpainting = False

    def on_cfg_denoiser(self, params: Any) -> None:
        self.step, self.total_steps = params.sampling_step, params.total_sampling_steps
        self._yoda_at = None
        if self.edit is not None and self.plan is not None and self.plan.edit_mask is not None and self.error is None:
            self._edit_input(params)
        if self.yoda is not None and self.plan is not None and self.plan.yoda is not None and self.error is None:
            self._yoda_input(params)

    # ---- masked upscaling (YODA) --------------------------------------------------------------
    def _yoda_input(self, params: Any) -> None:
        """First call of a pass: source latent (img2img's init latent, the hires pass's upscaled latent), the
        sampler's starting noise, the DINO map; every call: the model input keeps the noised source outside
        this call's mask (Forge's ``x`` has one row per image)."""
        run, x, sigma, den = self.yoda, params.x, params.sigma, params.denoiser
        z0 = getattr(den, "init_latent", None)
        if not isinstance(z0, torch.Tensor) or z0.shape[0] != x.shape[0]:
            self.fail(FIELD_BY_KEY["yoda_enabled"].error("this sampling pass has no source latent to upscale"))
            return
        at = (int(getattr(den, "step", self.step)), SERVICES.pass_calls(den))
        self._yoda_at = at
        view = (-1, 1, 1, 1)
        if not run.started:
            z0 = z0.to(x)
            try:
                run.start_pass(self.p, z0, (x - z0) / sigma.view(view).to(x))
            except SettingsError as e:
                self.fail(e)
                return
            run.mask_for(*at)  # the first call's input is the noised source everywhere: nothing to blend
            return
        if run.mask_for(*at) is not None:
            images = list(range(x.shape[0]))
            params.x = run.blend_input(x, images, run.z0.to(x) + run.noise.to(x) * sigma.view(view).to(x))

    def _yoda_saliency(self, key: Any, q: Any, k: Any, extra_options: dict) -> None:
        """The "unet" source: per-token saliency of the cond rows at the pass's first call (once per layer)."""
        run = self.yoda
        if run is None or self._yoda_at is None or run.amap is not None:
            return
        where = self._cond_chunk(key, q, extra_options, self._yoda_seen, "yoda_source")
        if where is None:
            return
        a, b, hw = where
        with torch.no_grad():
            sal = yd.self_attention_saliency(q[a:b], k[a:b], int(extra_options["n_heads"]))
        for i, s_ in enumerate(sal):
            run.add_unet(i, s_, hw)

    # ---- automatic edit mask ----------------------------------------------------------------
    def _edit_input(self, params: Any) -> None:
        """First step of a batch: source latent, starting noise and prompt words; later steps: the model
        input keeps the source, noised to this level, outside the mask (Forge's ``x`` has one row per image)."""
        run, x, sigma = self.edit, params.x, params.sigma
        den = params.denoiser
        z0 = getattr(den, "init_latent", None)
        if z0 is None:
            z0 = getattr(self.p, "init_latent", None)
        if not isinstance(z0, torch.Tensor) or z0.shape[0] != x.shape[0]:
            self.fail(FIELD_BY_KEY["edit_mask_enabled"].error("no init latent to keep (img2img only)"))
            return
        view = (-1, 1, 1, 1)
        if not run.started:
            prompts = list(getattr(self.p, "prompts", None) or [])[: x.shape[0]]
            if len(prompts) != x.shape[0]:
                prompts = [str(getattr(self.p, "prompt", ""))] * x.shape[0]
            z0 = z0.to(x)
            try:
                run.start(prompts, self._count_tokens, z0, (x - z0) / sigma.view(view).to(x))
            except SettingsError as e:
                self.fail(e)
            return
        images = list(range(x.shape[0]))
        params.x = run.blend_input(x, images, run.z0.to(x) + run.noise.to(x) * sigma.view(view).to(x))

    def _edit_attn2_patch(self, q: Any, k: Any, v: Any, extra_options: dict) -> Any:
        """attn2 replace patch on the mask layers: the host's attention gives the output; the probabilities
        are computed again for the cond rows of the step's first call only (not for PAG's or style's calls)."""
        heads = int(extra_options["n_heads"])
        out = _attention(q, k, v, heads)
        block = extra_options.get("block")
        key = (block[0], block[1], extra_options.get("block_index", 0)) if block is not None else None
        where = (
            None if self.edit is None else self._cond_chunk(key, q, extra_options, self._edit_seen, "edit_mask_layers")
        )
        if where is None:
            return out
        a, b, hw = where
        with torch.no_grad():
            probs = em.attention_probs(q[a:b], k[a:b], heads)
        for i, pr in enumerate(probs):
            self.edit.add(i, pr, hw)
        return out

    def _cond_chunk(self, key: Any, q: Any, extra_options: dict, seen: set, field: str) -> tuple | None:
        """For the maps of the edit mask and of masked upscaling: the cond rows of this attention call and its grid,
        ``(start, stop, (h, w))``, once per step and layer (the step's own model call, not PAG's extra call) and
        never in colorization's or style's calls; None otherwise.  A grid that does not fit fails ``field``."""
        if extra_options.get(_MODE) is not None or (self.step, key) in seen:
            return None
        flags = list(extra_options.get("cond_or_uncond") or [])
        if 0 not in flags or q.shape[0] % len(flags):
            return None
        seen.add((self.step, key))
        chunk = q.shape[0] // len(flags)
        start = flags.index(0) * chunk
        shape = extra_options.get("original_shape")
        try:
            hw = em.grid_of(int(q.shape[1]), (int(shape[-2]), int(shape[-1])))
        except (TypeError, ValueError) as e:
            self.fail(FIELD_BY_KEY[field].error(f"cannot place the attention map: {e}"))
            return None
        return start, start + chunk, hw

    def patch_unet(self, p: Any) -> None:
        """Called from ``process_before_every_sampling``: patch a clone of ``forge_objects.unet``."""
        fo = p.sd_model.forge_objects
        if self._inpainting or getattr(fo.unet, _CLONE_MARK, None) is self:
            return  # already patched for this pass (Forge calls the hook twice in the hires pass)
        self.patches.remove()  # block wrappers of the previous pass
        unet_module = getattr(fo.unet.model, "diffusion_model", None)
        if unet_module is None:
            self.fail(_unsupported_error(p))
            return
        is_hr = bool(getattr(p, "is_hr_pass", False))
        keys = layer_keys(unet_module)
        try:
            self.plan = plan_pass(self.settings, is_hr, keys, layer_widths(unet_module, keys), img2img=self._img2img)
        except SettingsError as e:
            self.fail(e)
            return
        if self.yoda is not None:
            if self.error is None:
                self.yoda.finish_pass(self.fail)  # the first pass before the hires pass
            self.yoda.begin_pass(self.plan.yoda)
            self._yoda_seen = set()
        if not self.plan.any:
            return
        clone = fo.unet.clone()
        setattr(clone, _CLONE_MARK, self)
        clone.set_model_sampler_post_cfg_function(self._post_cfg)
        self._col_params, self._style_keys = {}, set()
        self._yoda_keys = {k.forge_key for k in self.plan.yoda.layers} if self.plan.yoda is not None else set()
        if self.plan.colorize is not None:
            self._col_params = dict(
                zip((k.forge_key for k in self.plan.colorize.layers), self.plan.colorize.params, strict=True)
            )
            self._feats, self._feats_sigma = {}, None
            clone.set_model_unet_function_wrapper(self._unet_wrapper)
        if self.plan.style is not None:
            self.recorder = style.Recorder(self.plan.style.tau, self.plan.style.content_weight)
            self._style_keys = {k.forge_key for k in self.plan.style.layers}
        for key in set(self._col_params) | self._style_keys | self._yoda_keys:
            clone.set_model_patch_replace(self._attn1_patch, "attn1", key[0], key[1], key[2])
        if self.plan.edit_mask is not None and self.edit is not None:
            self.edit.plan = self.plan.edit_mask
            self._edit_seen = set()
            for k in self.plan.edit_mask.layers:
                clone.set_model_patch_replace(self._edit_attn2_patch, "attn2", *k.forge_key)
        fo.unet = clone

    def _post_cfg(self, args: dict) -> Any:
        denoised = args["denoised"]
        plan = self.plan
        if plan is None:
            return denoised
        model, sigma = args["model"], args["sigma"]
        calc = None
        if plan.pag is not None:
            scale = plan.pag.scale_at(self.step, self.total_steps, _timestep(model, sigma))
            if scale > 0:
                keys = [k.forge_key for k in plan.pag.layers]
                options = _with_attn1_replace(args["model_options"], _identity_attention, keys)
                calc = _calc_cond_uncond_batch()
                perturbed, _ = calc(model, args["cond"], None, args["input"], sigma, options)
                denoised = denoised + (args["cond_denoised"] - perturbed) * scale
        c = plan.colorize
        if c is not None and c.needs_plain_rows and c.active_at(self.step, self.total_steps):
            # colorization guidance: one cond-only call without the transfer gives the plain prediction
            options = _with_transformer_option(args["model_options"], _MODE, "off")
            calc = calc or _calc_cond_uncond_batch()
            plain, _ = calc(model, args["cond"], None, args["input"], sigma, options)
            cond = args["cond_denoised"]
            denoised = denoised + col.colorization_guidance(plain, cond, c.guidance) - cond
        if plan.style is not None and self.error is None and plan.style.active_at(self.step, self.total_steps):
            try:
                denoised = denoised + self._style_delta(args, denoised)
            except Exception as e:  # the host would log and drop it: fail the generation with the cause
                self.fail(style_io.error_for(e))
        if (
            plan.edit_mask is not None
            and self.edit is not None
            and self.edit.update(tuple(denoised.shape[-2:])) is not None
        ):
            denoised = self.edit.blend_denoised(denoised)
        at = self._yoda_at
        yoda_on = plan.yoda is not None and self.yoda is not None and at is not None and self.error is None
        if yoda_on and self.yoda.mask_for(*at) is not None:  # the masks multiply with the edit mask's (same source)
            denoised = self.yoda.blend_denoised(denoised)
        return denoised

    # ---- style reference ------------------------------------------------------------------
    def _style_delta(self, args: dict, denoised: Any) -> Any:
        """AD guidance for this step: a capture call on the noised style images, then the inner gradient
        steps on the cond-free (negative prompt) prediction's features; the host samples under
        ``inference_mode``, so every tensor the graph keeps is made outside it."""
        plan, si, rec = self.plan.style, self.style, self.recorder
        model = args["model"]
        conds = args.get("uncond") or args["cond"]  # the paper's null-prompt features: the negative prompt
        with torch.inference_mode(False):
            x, sigma, d = args["input"].clone(), args["sigma"].clone(), denoised.clone()
            z_ref = si.latents(self.p, SERVICES.encode, x.shape, x).clone()
            rows, clean, noise, owner, ref_of = si.capture_batch(z_ref, x, self.step, plan.content_weight > 0)
            target = ops.adain(d.float(), z_ref[ref_of].float()).to(d.dtype) if plan.adain else d
            x_cap = clean + noise * sigma[owner].view(-1, 1, 1, 1)
        options = _with_transformer_option(args["model_options"], _MODE, "off")
        calc = _calc_cond_uncond_batch()
        unet = model.diffusion_model
        rec.clear()
        with torch.inference_mode(False), torch.no_grad(), rec.capturing(rows, ref_of):
            calc(model, conds, None, x_cap, sigma[owner], options)
        # the AD gradient at the latent being sampled (classifier-guidance style); the displacement moves the
        # (AdaIN-matched) prediction
        with style.normal_weights(unet), style.snapshot_saved_tensors(unet):
            disp, losses = style.guided_displacement(
                lambda z: calc(model, conds, None, z, sigma, options), rec, x, plan.strength, plan.iters
            )
        rec.clear()
        self.style_losses.append(losses)
        return (target + disp - d).to(denoised.dtype)

    def _attn1_patch(self, q: Any, k: Any, v: Any, extra_options: dict) -> Any:
        """attn1 replace patch on the colorization and style layers: the style calls first, then colorization."""
        block = extra_options.get("block")
        key = (block[0], block[1], extra_options.get("block_index", 0)) if block is not None else None
        if key in self._yoda_keys:
            self._yoda_saliency(key, q, k, extra_options)
        if self.recorder.mode is not None and key in self._style_keys:
            return self.recorder.attend(key, q, k, v, int(extra_options["n_heads"]))
        if key in self._col_params:
            return self._colorize_patch(q, k, v, extra_options)
        return _attention(q, k, v, int(extra_options["n_heads"]))

    # ---- colorization ---------------------------------------------------------------------
    def _unet_wrapper(self, apply_model: Any, args: dict) -> Any:
        """``model_function_wrapper``: capture the streams once per step (one extra call), then run the
        host's call with the transfer on the chosen layers."""
        x, t, c = args["input"], args["timestep"], args["c"]
        to = c.get("transformer_options", {})
        plan = self.plan.colorize if self.plan else None
        if plan is None or to.get(_MODE) == "off" or not plan.active_at(self.step, self.total_steps):
            return apply_model(x, t, **c)
        ci = self.colorize
        n_images = ci.z_in.shape[0]
        sigma = float(t[0])
        if self._feats_sigma != sigma:
            self._capture(apply_model, x, t, c, n_images)
            self._feats_sigma = sigma
        c2 = dict(c)
        c2["transformer_options"] = {**to, _MODE: "transfer", "attn_toolkit_images": n_images}
        return apply_model(x, t, **c2)

    def _capture(self, apply_model: Any, x: Any, t: Any, c: dict, n_images: int) -> None:
        """One capture call per latent size: the input stream at the generation's, the reference streams at
        theirs (the same call when ``reference_scale`` is 1)."""
        ci = self.colorize
        ref_of = ci.ref_index(n_images)
        refs = sorted(set(ref_of))
        ref_owners = [ref_of.index(r) for r in refs]
        streams = [
            ("col_in", list(range(n_images)), list(range(n_images)), ci.z_in, ci.noise_in),
            ("col_ref", refs, ref_owners, ci.z_ref[refs], ci.noise_ref[refs]),
            ("col_refg", refs, ref_owners, ci.z_refg[refs], ci.noise_ref[refs]),
        ]
        self._feats = {}
        for size in dict.fromkeys(tuple(z.shape[-2:]) for *_, z, _ in streams):
            part = [st for st in streams if tuple(st[3].shape[-2:]) == size]
            owners = [o for _, _, own, _, _ in part for o in own]
            rows = [o % x.shape[0] for o in owners]
            sigma = t[rows]
            z = torch.cat([st[3] for st in part]).to(x)
            noise = torch.cat([st[4] for st in part]).to(x)
            x_cap = z + noise * sigma.view(-1, 1, 1, 1).to(x)
            c_cap = {
                k: (
                    col.resize_spatial(v[rows], size) if isinstance(v, torch.Tensor) and v.shape[0] == x.shape[0] else v
                )
                for k, v in c.items()
            }
            c_cap["transformer_options"] = {
                **c.get("transformer_options", {}),
                _MODE: "capture",
                "attn_toolkit_groups": [(name, src) for name, src, *_ in part],
                "cond_or_uncond": [0],
            }
            apply_model(x_cap, sigma, **c_cap)

    def _colorize_patch(self, q: Any, k: Any, v: Any, extra_options: dict) -> Any:
        """attn1 replace patch on the colorization layers (q, k, v projected: (rows, N, C))."""
        heads = int(extra_options["n_heads"])
        mode = extra_options.get(_MODE)
        block = extra_options.get("block")
        key = (block[0], block[1], extra_options.get("block_index", 0)) if block is not None else None
        plain = _attention(q, k, v, heads)
        if mode == "capture":
            store = self._feats.setdefault(key, {})
            row = 0
            for name, src in extra_options["attn_toolkit_groups"]:
                for s in src:
                    store.setdefault(name, {})[s] = (q[row], k[row], v[row])
                    row += 1
            return plain
        if mode != "transfer" or key not in self._col_params:
            return plain
        store = self._feats.get(key)
        if not store:
            self.fail(RuntimeError(f"Attention Toolkit: colorization features missing at {key}"))
            return plain
        n_images = int(extra_options["attn_toolkit_images"])
        ref_of = self.colorize.ref_index(n_images)
        owners = [r % n_images for r in range(q.shape[0])]
        feats = col.Features(
            torch.stack([store["col_in"][i][0] for i in owners]),
            torch.stack([store["col_in"][i][1] for i in owners]),
            torch.stack([store["col_refg"][ref_of[i]][1] for i in owners]),
            torch.stack([store["col_ref"][ref_of[i]][1] for i in owners]),
            torch.stack([store["col_ref"][ref_of[i]][2] for i in owners]),
        )
        lp = self._col_params[key]
        moved = col.dual_attention(
            q, v, feats.q_in, feats.k_in, feats.k_refg, feats.k_ref, feats.v_ref, heads, lp.gamma, lp.beta
        )
        s = self.plan.colorize.strength
        return moved if s >= 1 else moved * s + plain * (1 - s)


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
    attach(p, ForgeSession(p, settings))


def before_every_sampling(p: Any) -> None:
    session = get(p)
    if isinstance(session, ForgeSession):
        session.patch_unet(p)


def cleanup_model() -> int:
    return 0  # Forge patches live on clones that the host discards
