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

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from lib_attn import color, ops
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
        originals = [im.convert("RGB") for im in inits]
        p.init_images = [color.tensor_to_pil(color.luminance_only(color.pil_to_tensor(im))) for im in originals]
        full = getattr(p, "image_mask", None) is None and int(getattr(p, "resize_mode", 0) or 0) == 0
        return cls(
            originals,
            list(c.reference),
            c.adain,
            c.match_colors,
            full_resolution=full,
            reference_scale=c.reference_scale,
        )

    def ref_index(self, n_images: int) -> list[int]:
        return [0] * n_images if len(self.references) == 1 else list(range(n_images))

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
        if self.adain:
            idx = self.ref_index(self.z_in.shape[0])
            p.init_latent = ops.adain(self.z_in, self.z_ref[idx]).to(self.z_in.dtype)

    def finish_image(self, index: int, image: Image.Image) -> Image.Image:
        """The output image for batch position ``index``: chroma from ``image``, lightness from the original."""
        original = self.originals[index if len(self.originals) > 1 else 0]
        ref = self.references[0 if len(self.references) == 1 else index]
        if self.match_colors:
            out_lab = color.rgb_to_lab(color.pil_to_tensor(image))
            ref_lab = color.rgb_to_lab(col.blurred_reference(ref, image.size))
            image = color.tensor_to_pil(color.lab_to_rgb(col.match_chroma_stats(out_lab, ref_lab)))
        if not self.full_resolution:
            original = original.resize(image.size, Image.Resampling.LANCZOS)
        return color.keep_luminance(original, image)
