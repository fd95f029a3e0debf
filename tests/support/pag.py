"""PAG test helpers: script args, an independent perturbation, and an independent reference sampler."""

from __future__ import annotations

import contextlib

import torch

from lib_attn import settings as S

BASE = dict(prompt="a red cube", negative_prompt="blurry", seed=11, steps=4, cfg_scale=5.0, width=96, height=80)


def pag_args(**kw):
    values = {"pag_enabled": True, **{f"pag_{k}": v for k, v in kw.items()}}
    return S.defaults().with_values(values).to_args()


def attn1_modules(unet):
    return {n: m for n, m in unet.named_modules() if n.endswith("attn1")}


@contextlib.contextmanager
def identity_on(modules):
    """Independent perturbation: plain attribute swap of forward, restored afterwards."""
    saved = []
    for m in modules:
        saved.append(m)
        m.forward = lambda x, context=None, mask=None, _m=m, **kw: _m.to_out(_m.to_v(x))
    try:
        yield
    finally:
        for m in saved:
            del m.forward


def record_plain_run(h, **kw):
    """Run without the extension, recording start latent, sigmas and conds seen by the denoiser."""
    seen = {"sigmas": [], "x0": None, "cond": None, "uncond": None}
    cb = h.modules.script_callbacks

    def on_denoiser(params):
        b = params.text_uncond.shape[0]
        if seen["x0"] is None:
            seen["x0"] = params.x[-b:].clone()
            seen["cond"], seen["uncond"] = params.text_cond, params.text_uncond
        seen["sigmas"].append(float(params.sigma[0]))

    cb.on_cfg_denoiser(on_denoiser)
    try:
        out = h.txt2img(**{**BASE, **kw}, sampler_name="Euler", script_args=S.defaults().to_args())
    finally:
        cb.remove_callbacks_for_function(on_denoiser)
    return out, seen


def reference_sample(h, seen, cfg, pag_scale, layers, *, model_fn=None):
    mods = [h.modules.shared.sd_model.model.diffusion_model.get_submodule(p) for p in layers]
    return reference_guided(h, seen, cfg, [(pag_scale, lambda: identity_on(mods))], model_fn=model_fn)


def reference_guided(h, seen, cfg, terms, *, model_fn=None, cond_context=contextlib.nullcontext):
    """Independent CFG + perturbed-copy guidance: separate model calls per step (uncond, cond inside
    ``cond_context()``, and for each ``(scale, perturbation)`` of ``terms`` the cond again inside
    ``perturbation()``), fed to the real Euler sampler from the recorded start latent and sigmas."""
    import k_diffusion.external
    import k_diffusion.sampling

    model = h.modules.shared.sd_model
    den = k_diffusion.external.CompVisDenoiser(model)

    def cond_dict(c):
        return {"c_crossattn": [c], "c_concat": [torch.zeros(c.shape[0], 5, 1, 1, dtype=c.dtype)]}

    def f(x, sigma):
        u = den(x, sigma, cond=cond_dict(seen["uncond"]))
        with cond_context():
            c = den(x, sigma, cond=cond_dict(seen["cond"]))
        out = u + cfg * (c - u)
        for scale, perturbation in terms:
            with perturbation():
                p = den(x, sigma, cond=cond_dict(seen["cond"]))
            out = out + scale * (c - p)
        return out

    sigmas = torch.tensor([*seen["sigmas"], 0.0])
    with torch.no_grad():
        return k_diffusion.sampling.sample_euler(model_fn or f, seen["x0"] * 1.0, sigmas, disable=True)
