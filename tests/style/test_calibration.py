"""The style strength against the official sampler (Zhou et al.'s AD-guided sampling): per step, the official code
runs Adam (lr 0.015, 3 iterations for SD1.5) on the VP latent after its DDIM step; the extension's default (one
iteration) moves the latent being sampled as far, in k-diffusion units, through its denoised prediction and a
first-order sampler step.  Both run on the same loss surface: the tiny real ldm UNet with the AD loss."""

from __future__ import annotations

import math

import k_diffusion.sampling
import pytest
import torch

from lib_attn import settings as S
from lib_attn.methods.style import core as style
from tests.style.test_style import recording

OFFICIAL_LR, OFFICIAL_ITERS = 0.015, 3  # pipeline_sd.py's text-to-image defaults for SD1.5


def sd_sigmas() -> torch.Tensor:
    """k-diffusion sigma of each of SD's 1000 training timesteps (scaled-linear betas 0.00085-0.012)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0)
    return ((1 - a) / a).sqrt()


def t_of(sigma: float) -> float:
    """The (fractional) timestep of a sigma, interpolated in log sigma as k-diffusion's sigma_to_t does."""
    log = sd_sigmas().log()
    s = math.log(sigma)
    i = int(torch.searchsorted(log, torch.tensor(s, dtype=torch.float64)).clamp(1, 999))
    lo, hi = float(log[i - 1]), float(log[i])
    return i - 1 + (s - lo) / (hi - lo)


def karras(n: int = 20) -> list[float]:
    sig = sd_sigmas()
    return [float(s) for s in k_diffusion.sampling.get_sigmas_karras(n, float(sig[0]), float(sig[-1]))]


def surface(unet, sigma: float, seed: int = 0):
    """A latent being sampled at ``sigma`` (k units), and the loss surface: the AD loss against a reference noised
    to the same level, as a function of the UNet's input (the VP latent)."""
    g = torch.Generator().manual_seed(seed)
    z0, ref, n1, n2 = (torch.randn(1, 4, 8, 12, generator=g, dtype=torch.float64) for _ in range(4))
    ctx = torch.randn(1, 7, 32, generator=g, dtype=torch.float64)
    s = math.sqrt(1 + sigma**2)
    t = torch.tensor([t_of(sigma)], dtype=torch.float64)
    x_k = z0 + sigma * n1
    rec = style.Recorder()
    return x_k, s, t, ctx, (ref + sigma * n2) / s, rec


def official_displacement(unet, sigma: float) -> torch.Tensor:
    """What the official sampler does to its latent at this level, written from its description: Adam (lr 0.015) on
    the VP latent z, 3 iterations of forward with grad, loss, backward, step; returned in k units (z * sqrt(1+s^2))."""
    x_k, s, t, ctx, ref_vp, rec = surface(unet, sigma)
    with recording(unet, rec):
        rec.mode, rec.capture_rows = "capture", [("ref", 0)]
        with torch.no_grad():
            unet(ref_vp, t, context=ctx)
        z = (x_k / s).clone().requires_grad_(True)
        start = z.detach().clone()
        opt = torch.optim.Adam([z], lr=OFFICIAL_LR)
        with torch.enable_grad():
            for _ in range(OFFICIAL_ITERS):
                opt.zero_grad()
                rec.terms, rec.mode, rec.ref_of = [], "guided", [(0,)]
                unet(z, t, context=ctx)
                rec.mode = None
                rec.loss().backward()
                opt.step()
    return (z.detach() - start) * s


def extension_latent_move(unet, sigma: float, sigma_next: float, seen: list[float], lr: float, iters: int,
                          vp: bool = True, gain: bool = True) -> torch.Tensor:
    """How far the extension moves the next latent at this level: its displacement (``guided_displacement`` on the
    k-diffusion latent, the UNet fed ``c_in * x`` as k-diffusion does), added to the denoised prediction times the
    step gain the hooks estimate from the levels ``seen`` so far, through an Euler step to ``sigma_next``."""
    x_k, s, t, ctx, ref_vp, rec = surface(unet, sigma)
    with recording(unet, rec):
        rec.mode, rec.capture_rows = "capture", [("ref", 0)]
        with torch.no_grad():
            unet(ref_vp, t, context=ctx)
        rec.mode, rec.ref_of = None, [(0,)]
        scale = style.vp_scale(torch.tensor([sigma])).double() if vp else 1.0
        disp, _ = style.guided_displacement(lambda x: unet(x / s, t, context=ctx), rec, x_k, lr, iters, scale=scale)
    track = style.SigmaTrack()
    for level in seen:
        track.observe(level)
    g = track.gain(sigma, 20 - len(seen)) if gain else 1.0
    # Euler: x' = x + (s' - s) (x - D) / s, so a change d of D moves x' by (1 - s'/s) d
    return (1 - sigma_next / sigma) * g * disp


@pytest.mark.parametrize("index", [2, 9, 16])
def test_default_strength_moves_the_latent_as_far_as_the_official_sampler(unet64, index):
    """Within 10 % (mean absolute displacement per element) at three noise levels of a 20-step Karras schedule."""
    sig = karras()
    sigma, sigma_next = sig[index], sig[index + 1]
    defaults = S.defaults().style
    official = official_displacement(unet64, sigma)
    ours = extension_latent_move(unet64, sigma, sigma_next, sig[: index + 1], defaults.strength, defaults.iters)
    ratio = float(ours.abs().mean() / official.abs().mean())
    print(f"sigma {sigma:.3f}: official {float(official.abs().mean()):.4f}, ours {float(ours.abs().mean()):.4f}")
    assert 0.9 <= ratio <= 1.1, ratio
    # same direction, not only the same size
    assert float(torch.nn.functional.cosine_similarity(ours.flatten(), official.flatten(), dim=0)) > 0.8


def test_the_former_units_would_fail_the_calibration(unet64):
    """The former scheme (lr 0.2 on the k-diffusion latent, the displacement added to the prediction as it is)
    moves the latent several times less than the official sampler at high noise: the check above can fail."""
    sig = karras()
    index = 2
    official = official_displacement(unet64, sig[index])
    former = extension_latent_move(unet64, sig[index], sig[index + 1], sig[: index + 1], 0.2, 1, vp=False, gain=False)
    ratio = float(former.abs().mean() / official.abs().mean())
    assert ratio < 0.5, ratio


@pytest.mark.parametrize("schedule", ["karras", "uniform", "exponential"])
def test_step_gain_estimate_against_the_schedule(schedule):
    """The hooks see only the current level: the next one is estimated from the trend of the last ratios.  The gain
    ``s / (s - s_next)`` it gives is within 8 % of the true one at every step after the first of a 20-step schedule
    (the uniform one: but the three steps before its last, where its ratios fall fast), within 40 % at the first, and exactly 1 at
    the last (to sigma 0)."""
    sig_table = sd_sigmas()
    lo, hi = float(sig_table[0]), float(sig_table[-1])
    if schedule == "karras":
        sig = k_diffusion.sampling.get_sigmas_karras(20, lo, hi)
    elif schedule == "exponential":
        sig = k_diffusion.sampling.get_sigmas_exponential(20, lo, hi)
    else:  # A1111's "Automatic" for Euler: the timesteps spaced evenly (k-diffusion's DiscreteSchedule.get_sigmas)
        t = torch.linspace(999, 0, 20, dtype=torch.float64)
        i = t.floor().long()
        w = t - i
        log = sig_table.log()
        sig = torch.cat([(log[i] * (1 - w) + log[(i + 1).clamp(max=999)] * w).exp(), torch.zeros(1, dtype=torch.float64)])
    sig = [float(s) for s in sig]
    track = style.SigmaTrack()
    for i in range(len(sig) - 1):
        track.observe(sig[i])
        want = style.step_gain(sig[i], sig[i + 1])
        got = track.gain(sig[i], len(sig) - 2 - i)
        tol = 0.40 if i == 0 else 0.08
        if schedule == "uniform" and i >= len(sig) - 5:
            tol = 1.1
        assert abs(got / want - 1) <= tol, (schedule, i, got, want)
    assert track.gain(sig[-2], 0) == 1.0
