"""Reference colorization: the images around sampling, on the processing object ``p`` (A1111 and Forge
share these attributes of ``StableDiffusionProcessingImg2Img``).

* ``Script.process`` (before ``p.init``): the init images are kept and replaced by their lightness
  only (Lab L, a = b = 0), so the model sees a grayscale photo.
* at the start of sampling (after ``p.init``): the references and their gray versions are VAE-encoded
  at the generation size, fixed noise is drawn for the capture streams, and the start latent is
  AdaIN-matched to the reference (optional, as the paper does).
* ``postprocess_image`` (per image): the output's chroma is matched to the reference's statistics
  (optional) and put under the **original** init image's lightness at its full resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from lib_attn import color, ops
from lib_attn.methods.base import sigma_schedule
from lib_attn.methods.colorize import core as col
from lib_attn.settings import FIELD_BY_KEY, Settings

NOISE_OFFSET = 7919  # the reference streams' noise is seeded apart from the input stream's


def _noise(shape: torch.Size, seed: int) -> torch.Tensor:
    """Fixed noise for a capture stream, from the seed of the image that owns it (so a row's result
    does not depend on the batch it is in)."""
    g = torch.Generator().manual_seed(int(seed) & 0xFFFFFFFF)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def is_img2img(p: Any) -> bool:
    return hasattr(p, "init_images")


@dataclass
class ColorizeInputs:
    originals: list[Image.Image]
    references: list[Image.Image]
    adain: bool
    match_colors: bool
    z_in: torch.Tensor | None = None  # gray input latents (B, C, h, w), before AdaIN
    z_ref: torch.Tensor | None = None  # colour references (R, C, h, w)
    z_refg: torch.Tensor | None = None  # gray references
    noise_in: torch.Tensor | None = None
    noise_ref: torch.Tensor | None = None
    full_resolution: bool = True
    reference_scale: float = 1.0
    paper: bool = False  # the paper's regime (sampler_function)
    passes: int = 3
    noise_refg: torch.Tensor | None = None  # the gray reference stream's (the colour one's outside the paper regime)
    inverting: bool = False  # the paper's regime is inverting: the transfer is off for these model calls
    host: tuple | None = None  # (p, services) of the sampling call in progress

    @classmethod
    def prepare(cls, p: Any, settings: Settings) -> ColorizeInputs:
        c = settings.colorize
        if not is_img2img(p):
            raise FIELD_BY_KEY["colorize_enabled"].error(
                "reference colorization works in img2img: the init image is the photo to colorize"
            )
        inits = [im for im in (p.init_images or []) if im is not None]
        if not inits:
            raise FIELD_BY_KEY["colorize_enabled"].error("img2img has no init image to colorize")
        batch = int(getattr(p, "batch_size", 1) or 1)
        if len(c.reference) not in (1, batch):
            raise FIELD_BY_KEY["colorize_reference"].error(
                f"give one reference for all images or one per image of the batch ({batch}), got {len(c.reference)}"
            )
        if c.paper and (getattr(p, "image_mask", None) is not None or int(getattr(p, "resize_mode", 0) or 0) != 0):
            raise FIELD_BY_KEY["colorize_paper"].error(
                "the paper's regime recombines the whole image: use resize mode 'Just resize' and no inpainting mask"
            )
        originals = [im.convert("RGB") for im in inits]
        p.init_images = [color.tensor_to_pil(color.luminance_only(color.pil_to_tensor(im))) for im in originals]
        full = getattr(p, "image_mask", None) is None and int(getattr(p, "resize_mode", 0) or 0) == 0
        return cls(
            originals,
            list(c.reference),
            c.adain,
            c.match_colors,
            full_resolution=full,
            reference_scale=1.0 if c.paper else c.reference_scale,  # the paper's streams are full size
            paper=c.paper,
            passes=c.passes,
        )

    def ref_index(self, n_images: int) -> list[int]:
        return [0] * n_images if len(self.references) == 1 else list(range(n_images))

    def begin(self, p: Any, services: Any) -> None:
        """Start of a sampling call: the references encoded, the capture noise drawn, the start latent set."""
        self.host = (p, services)
        self.encode(p, services.encode)

    def encode(self, p: Any, encode: Any) -> None:
        """VAE-encode the references, draw the capture noise and (optionally) AdaIN the start latent."""
        p.color_corrections = None  # img2img colour correction would pull the colours back to the gray input
        if self.z_in is None:
            self.z_in = p.init_latent.detach().clone()
            h, w = (col.reference_side(int(s), self.reference_scale) for s in self.z_in.shape[-2:])
            size = (w * 8, h * 8)  # the reference streams' size (smaller than the generation's below scale 1)
            refs = [r.resize(size, Image.Resampling.LANCZOS) for r in self.references]
            grays = [r.convert("L").convert("RGB") for r in refs]
            self.z_ref = encode(p, torch.stack([color.pil_to_tensor(r) for r in refs]).float()).detach()
            self.z_refg = encode(p, torch.stack([color.pil_to_tensor(r) for r in grays]).float()).detach()
            self.z_ref, self.z_refg = self.z_ref.to(self.z_in), self.z_refg.to(self.z_in)
        # noise follows the seeds of the current batch (n_iter > 1 calls sampling once per batch)
        seeds = [int(x) for x in (getattr(p, "seeds", None) or getattr(p, "all_seeds", None) or [0])]
        n = self.z_in.shape[0]
        seeds = (seeds * n)[:n] if len(seeds) < n else seeds[:n]
        owners = [self.ref_index(n).index(r) for r in range(len(self.references))]
        self.noise_in = torch.stack([_noise(self.z_in.shape[1:], s) for s in seeds])
        self.noise_ref = torch.stack([_noise(self.z_ref.shape[1:], seeds[o] + NOISE_OFFSET) for o in owners])
        self.noise_refg = self.noise_ref
        if self.adain:
            idx = self.ref_index(self.z_in.shape[0])
            p.init_latent = ops.adain(self.z_in, self.z_ref[idx]).to(self.z_in.dtype)

    def finish_image(self, index: int, image: Image.Image, full_resolution: bool | None = None) -> Image.Image:
        """The output image for batch position ``index``: chroma from ``image``, lightness from the original (at its
        own resolution with ``full_resolution``, default the generation's settings allow it; else at ``image``'s)."""
        original = self.originals[index if len(self.originals) > 1 else 0]
        ref = self.references[0 if len(self.references) == 1 else index]
        if self.match_colors:
            out_lab = color.rgb_to_lab(color.pil_to_tensor(image))
            ref_lab = color.rgb_to_lab(col.blurred_reference(ref, image.size))
            image = color.tensor_to_pil(color.lab_to_rgb(col.match_chroma_stats(out_lab, ref_lab)))
        if not (self.full_resolution if full_resolution is None else full_resolution):
            original = original.resize(image.size, Image.Resampling.LANCZOS)
        return color.keep_luminance(original, image)

    # ---- the paper's regime ---------------------------------------------------------------------------
    def sampler_function(self) -> Callable[..., torch.Tensor] | None:
        """The paper's regime: the function that replaces the host's k-diffusion sampling function.  The gray
        input and the references are DDIM-inverted (deterministic, the model at CFG 1, the transfer off) from t = 1
        to t = 121 (:data:`col.PAPER_INVERSION`); the capture streams of each step then carry the inverted latents
        of that level; 5 deterministic steps from t = 121 (:data:`col.PAPER_SAMPLING`) with the transfer and the
        colorization guidance; between passes the result is decoded, recombined (the input's lightness, the
        reference's colour statistics), encoded and inverted again.  Returns the last pass's latent."""
        if not self.paper:
            return None

        def paper(model, x, extra_args=None, callback=None, disable=None, sigmas=None, **_):
            sigma_schedule(sigmas, FIELD_BY_KEY["colorize_paper"], "the paper's regime")
            extra = extra_args if extra_args is not None else {}
            saved = extra.get("cond_scale")
            extra["cond_scale"] = 1.0  # the paper's model calls have no CFG (the host reads the scale here too)
            try:
                return self._paper_passes(model, x, extra, callback)
            finally:
                extra["cond_scale"] = saved

        return paper

    def _paper_passes(self, model: Any, x: torch.Tensor, extra: dict, callback: Any) -> torch.Tensor:
        sig = ops.sd_sigmas()
        n = x.shape[0]
        ref_of = self.ref_index(n)
        refs = sorted(set(ref_of))

        def call(z: torch.Tensor, t: int) -> torch.Tensor:
            return model(z.to(x), torch.full((n,), float(sig[t]), device=x.device, dtype=x.dtype), **extra)

        def invert(z0: torch.Tensor) -> dict[int, torch.Tensor]:
            """The DDIM-inverted latents of ``z0`` (B rows) at each timestep of the inversion; the clean latent is
            taken as the VP latent of the first timestep, as the official inversion does."""
            z, out = z0.to(x) * float((1 + sig[col.PAPER_INVERSION[0]] ** 2) ** 0.5), {}
            self.inverting = True
            try:
                for t, t_next in zip(col.PAPER_INVERSION[:-1], col.PAPER_INVERSION[1:], strict=True):
                    z = col.ddim_move(z, call(z, t), float(sig[t]), float(sig[t_next]))
                    out[t_next] = z
            finally:
                self.inverting = False
            return out

        assert self.z_in is not None and self.z_ref is not None and self.z_refg is not None
        z_in, z_ref, z_refg = self.z_in.to(x), self.z_ref.to(x), self.z_refg.to(x)
        inv_in, inv_ref, inv_refg = invert(z_in), invert(z_ref[ref_of]), invert(z_refg[ref_of])
        first = [ref_of.index(r) for r in refs]
        start = col.PAPER_SAMPLING[0]
        z = inv_in[start]
        if self.adain:
            z = ops.adain(z, inv_ref[start]).to(z.dtype)
        p, services = self.host if self.host is not None else (None, None)
        step = 0
        for k in range(self.passes):
            for i, t in enumerate(col.PAPER_SAMPLING):
                s = float(sig[t])
                # the capture streams carry the inverted latents of this level: z + noise * s
                self.noise_in = ((inv_in[t] - z_in) / s).float()
                self.noise_ref = ((inv_ref[t][first] - z_ref[refs]) / s).float()
                self.noise_refg = ((inv_refg[t][first] - z_refg[refs]) / s).float()
                nxt = col.PAPER_SAMPLING[i + 1] if i + 1 < len(col.PAPER_SAMPLING) else None
                d = call(z, t)
                z = col.ddim_move(z, d, s, float(sig[nxt]) if nxt is not None else 0.0)
                if callback is not None:
                    sigma = torch.full((n,), s, device=x.device, dtype=x.dtype)
                    callback({"x": z, "i": step, "sigma": sigma, "sigma_hat": sigma, "denoised": d})
                step += 1
            if k + 1 < self.passes:
                if services is None:
                    raise RuntimeError("Attention Toolkit: the paper's regime has no host to decode with")
                images = services.decode(p, z)
                again = torch.stack(
                    [
                        color.pil_to_tensor(self.finish_image(i, color.tensor_to_pil(img), full_resolution=False))
                        for i, img in enumerate(images)
                    ]
                ).float()
                z = invert(services.encode(p, again).to(x))[start]
        return z
