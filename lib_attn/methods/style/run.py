"""Style reference: the images around sampling (shared by the A1111 and Forge adapters).

* ``prepare`` (in ``Script.process``): the style images are checked against the batch size.
* ``latents(shape)``: the style images VAE-encoded at the size of the latent being sampled (first pass and
  hires pass differ), cached per size.
* ``noise(step, shape)``: the reference is noised with fresh noise at every guided step, as the official
  pipeline does, drawn from the generation's seed so that a run is reproducible.
* ``content``: img2img's init latent (the content image of the content loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from lib_attn import color, ops
from lib_attn.methods.base import sigma_schedule
from lib_attn.methods.style import core
from lib_attn.settings import FIELD_BY_KEY, Settings, SettingsError

NOISE_OFFSET = 104729  # the style noise is seeded apart from the sampler's and colorization's
REF_SALT = 6151  # and apart for each style image


@dataclass
class StyleInputs:
    references: list[Image.Image]
    content: torch.Tensor | None = None  # img2img: init latents (B, C, h, w)
    seeds: list[int] = field(default_factory=lambda: [0])
    _latents: dict = field(default_factory=dict)
    settings: Any = None  # the style section
    losses: list = field(default_factory=list)  # per guided step, the loss at each inner iteration
    transfer: core.TransferState | None = None  # mode transfer, while its loop runs

    @classmethod
    def prepare(cls, p: Any, settings: Settings) -> StyleInputs:
        refs = list(settings.style.reference)
        batch = int(getattr(p, "batch_size", 1) or 1)
        if settings.style.mode == "transfer" and not getattr(p, "init_images", None):
            raise FIELD_BY_KEY["style_mode"].error(
                "transfer optimizes the init image's latent: use it in img2img (guidance works in txt2img)"
            )
        if settings.style.pairing == "each" and len(refs) not in (1, batch):
            raise FIELD_BY_KEY["style_reference"].error(
                f"with 'Several style images' each, give one style image for all images or one per image of the "
                f"batch ({batch}), got {len(refs)}"
            )
        return cls(refs, settings=settings.style)

    def begin(self, p: Any) -> None:
        """At the start of a sampling call: the content latent (img2img) and this batch's seed."""
        init = getattr(p, "init_latent", None)
        self.content = init.detach().clone() if isinstance(init, torch.Tensor) else None
        self.seeds = [int(x) for x in (getattr(p, "seeds", None) or getattr(p, "all_seeds", None) or [0])]

    def sampler_function(self) -> Callable[..., torch.Tensor] | None:
        """Mode transfer: the function that replaces the host's k-diffusion sampling function for the sampling
        call.  It ignores the noised latent it is given and optimizes the content (init) latent instead: at each of
        the host's steps one model call with the latent fed clean at the step's timestep
        (:func:`core.transfer_timesteps`), during which the hooks take one Adam step (:attr:`transfer`); the host's
        progress callback runs after each.  It returns the optimized latent, which the host decodes."""
        st = self.settings
        if st is None or st.mode != "transfer" or st.transfer_lr <= 0:
            return None

        def transfer(model, x, extra_args=None, callback=None, disable=None, sigmas=None, **_):
            sigma_schedule(sigmas, FIELD_BY_KEY["style_mode"], "transfer")
            if self.content is None:
                raise FIELD_BY_KEY["style_mode"].error("transfer found no init latent to optimize (img2img only)")
            table = ops.sd_sigmas()
            steps = core.transfer_timesteps(len(sigmas) - 1, float(sigmas[0]))
            self.transfer = core.TransferState.start(self.content.to(x.device), st.transfer_lr)
            try:
                for i, t in enumerate(steps):
                    sigma = float(table[t])
                    x_in = (self.transfer.z.detach() * math.sqrt(1 + sigma**2)).to(x.dtype)
                    sig = torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)
                    model(x_in, sig, **(extra_args or {}))
                    if callback is not None:
                        z = self.transfer.z.detach().to(x.dtype)
                        callback({"x": x_in, "i": i, "sigma": sig, "sigma_hat": sig, "denoised": z})
                return self.transfer.z.detach().to(x.dtype)
            finally:
                self.transfer = None

        return transfer

    def ref_index(self, n_images: int) -> list[tuple[int, ...]]:
        """The style images each image attends to: all of them (pairing ``all``), else its own (``each``)."""
        if self.settings is None or self.settings.pairing == "all" or len(self.references) == 1:
            return [tuple(range(len(self.references)))] * n_images
        return [(i,) for i in range(n_images)]

    @staticmethod
    def adain_refs(z: torch.Tensor, ref_of: list[tuple[int, ...]], index: list[int] | None = None) -> torch.Tensor:
        """Per image, the latents whose statistics AdaIN takes: its style images' side by side (the statistics of
        all of them together).  ``z`` holds the style latents in the order ``index`` gives (default: 0, 1, ...)."""
        pos = {r: i for i, r in enumerate(index if index is not None else range(z.shape[0]))}
        return torch.stack([torch.cat([z[pos[r]] for r in own], dim=-1) for own in ref_of])

    def adain_prediction(self, d: torch.Tensor, z_ref: torch.Tensor, ref_of: list[tuple[int, ...]]) -> torch.Tensor:
        """AdaIN ``denoised``: the prediction ``d`` takes its clean style latents' statistics (``z_ref``: all style
        latents, in index order)."""
        return ops.adain(d.float(), self.adain_refs(z_ref, ref_of).float()).to(d.dtype)

    def adain_shift(
        self, x: torch.Tensor, x_cap: torch.Tensor, rows: list, ref_of: list[tuple[int, ...]]
    ) -> torch.Tensor:
        """AdaIN ``noisy`` (the paper's): the change that gives the latent being sampled ``x`` the statistics of its
        style latents noised to the same level, the style rows of the capture call (``x_cap``, described by ``rows``
        as :meth:`capture_batch` returns them)."""
        refs = [r for what, r in rows if what == "ref"]
        noisy = self.adain_refs(x_cap[: len(refs)], ref_of, refs)
        return (ops.adain(x.float(), noisy.float()) - x.float()).to(x.dtype)

    def latents(self, p: Any, encode: Any, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """(R, C, h, w) latents of the style images for latents of ``shape`` (B, C, h, w)."""
        h, w = int(shape[-2]), int(shape[-1])
        z = self._latents.get((h, w))
        if z is None:
            size = (w * 8, h * 8)
            imgs = [r.resize(size, Image.Resampling.LANCZOS) for r in self.references]
            with torch.no_grad():
                z = encode(p, torch.stack([color.pil_to_tensor(r) for r in imgs]).float()).detach()
            if z.shape[-2:] != (h, w):  # sizes that are not multiples of 8
                z = torch.nn.functional.interpolate(z.float(), size=(h, w), mode="bilinear", align_corners=False)
            self._latents[(h, w)] = z
        return z.to(like)

    def noise(self, step: int, owners: list[int], shape: torch.Size, like: torch.Tensor, salt: int = 0) -> torch.Tensor:
        """Noise for capture rows, one per entry of ``owners`` (the batch image whose seed it follows, so an
        image's result does not depend on the batch it is in); fresh at every step."""
        rows = []
        for o in owners:
            seed = self.seeds[o] if o < len(self.seeds) else self.seeds[0] + o
            g = torch.Generator().manual_seed((seed + NOISE_OFFSET + salt + 7919 * int(step)) & 0xFFFFFFFF)
            rows.append(torch.randn(tuple(shape[-3:]), generator=g, dtype=torch.float32))
        return torch.stack(rows).to(like)

    def capture_batch(self, z_ref: torch.Tensor, x: torch.Tensor, step: int, content: bool) -> tuple:
        """Rows of the capture call for latents ``x`` (B, C, h, w): the style images (``z_ref``, their ``latents``
        at this size; one row per distinct reference, owned by its first image) and, with ``content``, img2img's
        init latents.  Returns ``(rows, clean latents, noise, owner image per row, ref_of)`` (``ref_of[i]``: the
        references of image i, a tuple); the caller noises them the host's way.  The first ``len(refs)`` rows are
        the style images, in index order."""
        n = x.shape[0]
        ref_of = self.ref_index(n)
        refs = sorted({r for own in ref_of for r in own})
        owner = [next(i for i, own in enumerate(ref_of) if r in own) for r in refs]
        rows = [("ref", r) for r in refs]
        clean = [z_ref[refs]]
        # each style image its own noise, by its place among its owner's style images (the first: salt 0, so an
        # image with one style image draws the same noise in any batch)
        salts = [REF_SALT * ref_of[o].index(r) for o, r in zip(owner, refs, strict=True)]
        noise = [torch.cat([self.noise(step, [o], x.shape, x, salt=t) for o, t in zip(owner, salts, strict=True)])]
        if content and self.content is not None and self.content.shape[-2:] == x.shape[-2:]:
            rows += [("content", i) for i in range(n)]
            clean.append(self.content[:n].to(x))
            noise.append(self.noise(step, list(range(n)), x.shape, x, salt=10007))
            owner = owner + list(range(n))
        return rows, torch.cat(clean), torch.cat(noise), owner, ref_of


def error_for(e: Exception) -> Exception:
    """The message a failure of the guided pass gives the user (the host would log and drop it)."""
    if isinstance(e, SettingsError):
        return e
    text = str(e)
    if "out of memory" in text.lower():
        return FIELD_BY_KEY["style_checkpointing"].error(
            "the guided pass ran out of memory; switch gradient checkpointing on, lower the inner steps, the size "
            "or the batch"
        )
    return RuntimeError(f"Attention Toolkit: style reference failed: {type(e).__name__}: {text}")
