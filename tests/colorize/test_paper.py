"""Reference colorization's paper regime (``colorize.paper``) against the official procedure written independently
in its own (VP, DDIM) terms on the tiny UNet: the gray input and both references DDIM-inverted from t = 1 to
t = 121 with the empty prompt, the AdaIN'd start, 5 DDIM steps (121, 101, 81, 61, 41, the last to the clean latent)
whose capture features come from the inverted latents of each level, colorization guidance ``e_plain + w (e_tr -
e_plain)`` at CFG 1, and between passes the output recombined with the input's lightness, encoded and inverted
again.  Also on the Forge double, the refusals, and the UI/infotext round trip of the two new fields."""

from __future__ import annotations

import importlib

import pytest
import torch

from lib_attn import color, ops
from lib_attn.methods.colorize import core as col
from tests.colorize.test_colorize import SD1_LAYERS, col_args, spy_inputs, transferred
from tests.fakes.a1111_double import a1111_host
from tests.fakes.forge_env import forge_host
from tests.support.helpers import SCRIPT, assert_no_leftovers
from tests.support.images import photo, small

KW = dict(prompt="", negative_prompt="", seed=5, steps=8, cfg_scale=6.0, width=96, height=80,
          sampler_name="Euler", denoising_strength=0.5)


def official_regime(h, inputs, params, w, passes):
    """The paper's regime, written from its description with the UNet called directly (eps, integer timesteps)."""
    model = h.modules.shared.sd_model
    common = importlib.import_module("modules.sd_samplers_common")  # the double's, while it is entered
    unet = model.model.diffusion_model
    mods = [unet.get_submodule(p) for p in SD1_LAYERS]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    null = model.get_learned_conditioning([""]).to(torch.float64)

    def eps(x, t):
        return unet(x, torch.full((x.shape[0],), float(t), dtype=torch.float64), context=null.expand(x.shape[0], -1, -1))

    def ddim(x, e, t, t_next):
        x0 = (x - (1 - ac[t]).sqrt() * e) / ac[t].sqrt()
        return x0 if t_next is None else ac[t_next].sqrt() * x0 + (1 - ac[t_next]).sqrt() * e

    def invert(z):
        x, out = z.clone(), {}
        for t, t_next in zip((1, 21, 41, 61, 81, 101), (21, 41, 61, 81, 101, 121), strict=True):
            x = ddim(x, eps(x, t), t, t_next)
            out[t_next] = x
        return out

    def features(streams, t):
        grabbed = {}
        hooks = [m.register_forward_hook(lambda mod, a, o, i=i: grabbed.__setitem__(i, a[0])) for i, m in
                 enumerate(mods)]
        try:
            eps(torch.cat(streams), t)
        finally:
            for hk in hooks:
                hk.remove()
        out = []
        for i, m in enumerate(mods):
            hin, href, hrefg = grabbed[i].split([1, 1, 1])
            out.append((m.to_q(hin), m.to_k(hin), m.to_k(hrefg), m.to_k(href), m.to_v(href)))
        return out

    with torch.no_grad():
        inv_in, inv_ref, inv_refg = (invert(z.to(torch.float64)) for z in (inputs.z_in, inputs.z_ref, inputs.z_refg))
        x = ops.adain(inv_in[121], inv_ref[121])
        steps = (121, 101, 81, 61, 41)
        for k in range(passes):
            for i, t in enumerate(steps):
                feats = features([inv_in[t], inv_ref[t], inv_refg[t]], t)
                with transferred(mods, feats, params, 1.0):
                    e_tr = eps(x, t)
                e_plain = eps(x, t)
                x = ddim(x, e_plain + w * (e_tr - e_plain), t, steps[i + 1] if i + 1 < len(steps) else None)
            if k + 1 < passes:
                img = ((common.samples_to_images_tensor(x, 0, model).float() + 1) / 2).clamp(0, 1)
                rgb = color.pil_to_tensor(inputs.finish_image(0, color.tensor_to_pil(img[0]), full_resolution=False))
                z = common.images_tensor_to_samples(rgb[None].float(), None, model).to(torch.float64)
                x = invert(z)[121]
    return x


@pytest.mark.parametrize("passes", [1, 2])
def test_paper_regime_equals_the_official_procedure(passes):
    init, ref = small("cheetah1.jpg").convert("L").convert("RGB"), photo("lion.jpg")
    w = 10.0
    with a1111_host("sd1", dtype=torch.float64) as h, spy_inputs() as seen:
        h.load_script(SCRIPT)
        h.unet_calls.clear()
        out = h.img2img(**KW, init_images=[init], script_args=col_args(ref, paper=True, passes=passes)).samples
        calls = len(h.unet_calls)
        assert not h.errors
        assert_no_leftovers(h)
        inputs = seen[0]
        assert inputs.z_ref.shape == inputs.z_in.shape  # the paper's streams are full size
        unet = h.modules.shared.sd_model.model.diffusion_model
        widths = [unet.get_submodule(p).to_q.in_features for p in SD1_LAYERS]
        params = [(0.5, 0.5) if wd == min(widths) else (1.0, 0.0) for wd in widths]
        want = official_regime(h, inputs, params, w, passes)
        with a1111_host("sd1", dtype=torch.float64) as plain_host:
            plain = plain_host.img2img(**KW, init_images=[init]).samples
    # 3 inversions of 6 calls, 5 steps per pass, 6 re-inversion calls between passes (the capture streams ride in
    # the steps' calls: no call of their own)
    assert calls == 18 + 5 * passes + 6 * (passes - 1)
    err = float((out - want).abs().max())
    print(f"passes {passes}: max |ours - official| {err:.2e}, result scale {float(want.abs().mean()):.3f}")
    # the double's float32 alphas_cumprod (sigma to timestep) against the float64 one here: about 1e-5
    assert err < (1e-4 if passes == 1 else 1e-3) * float(want.abs().max())
    assert float((out - plain).abs().max()) > 1e-2


def test_paper_regime_on_forge_and_its_refusals():
    init, ref = small("cheetah1.jpg").convert("L").convert("RGB"), photo("lion.jpg")
    with forge_host("sd1") as h:
        h.load_script(SCRIPT)
        out = h.img2img(**KW, init_images=[init], script_args=col_args(ref, paper=True, passes=2))
        plain = h.img2img(**KW, init_images=[init], script_args=col_args(ref))
        assert not h.errors and h.callback_count() == 0
        unet = h.modules.shared.sd_model.forge_objects.unet.model.diffusion_model
        assert all("forward" not in m.__dict__ for m in unet.modules())
    assert "Colorize paper: True" in out.infotexts[0] and "Colorize passes: 2" in out.infotexts[0]
    assert (out.samples - plain.samples).abs().max() > 1e-3
    with a1111_host("sd1") as h:
        h.load_script(SCRIPT)
        with pytest.raises(Exception, match=r"\(colorize\.paper\).*k-diffusion sampler"):
            h.img2img(**dict(KW, sampler_name="DDIM"), init_images=[init], script_args=col_args(ref, paper=True))
        with pytest.raises(Exception, match=r"\(colorize\.paper\).*Just resize"):
            h.img2img(**KW, init_images=[init], mask=init.convert("L"), script_args=col_args(ref, paper=True))
        again = h.img2img(**KW, init_images=[init]).samples  # the WebUI goes on
        assert again.shape[0] == 1
        assert_no_leftovers(h)


def test_schedule_is_the_papers():
    sig = ops.sd_sigmas()
    assert col.PAPER_INVERSION == (1, 21, 41, 61, 81, 101, 121) and col.PAPER_SAMPLING == (121, 101, 81, 61, 41)
    assert 0.38 < float(sig[121]) < 0.40  # sigma 0.39, the level the docs name
    x, d = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)).unbind(0)
    there = col.ddim_move(x, d, 0.2, 0.5)
    assert torch.allclose(col.ddim_move(there, d, 0.5, 0.2), x)  # DDIM with a fixed prediction runs both ways
    assert torch.equal(col.ddim_move(x, d, 0.2, 0.0), d)
