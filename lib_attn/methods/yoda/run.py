"""Masked upscaling (YODA): the per-generation run around sampling (shared by the A1111 and Forge adapters).

* ``prepare`` (from ``process``): checks where it can act (img2img, or txt2img with hires fix) and, for a
  DINO source, loads the model (from the WebUI's ``models/dino`` folder, downloaded there on first use).
* ``start_pass`` (first model call of a pass it acts on): the pass's source latent (img2img's init latent,
  the hires pass's upscaled latent), the noise the sampler started from, and, for DINO, the attention map
  of that latent's RGB preview.  The "unet" source fills the map from the first call's self-attention.
* ``mask_for``: the mask of a model call (schedule of :mod:`lib_attn.methods.yoda`), kept for the preview.
* ``blend_input`` / ``blend_denoised``: the source, noised to the current level, outside the mask.
* ``finish_pass`` / ``images``: the previews (attention map | share of the steps each pixel was diffused).

Blending is a lerp toward the same noised source as the edit mask's, so when both are on the two masks
multiply (``lerp(s, lerp(s, x, a), b) = lerp(s, x, a*b)``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from lib_attn.methods.yoda import core as yd
from lib_attn.methods.yoda import dino
from lib_attn.settings import FIELD_BY_KEY, Settings

log = logging.getLogger("lib_attn")
Tensor = torch.Tensor

DINO_REPOS = {"dino-vits8": "facebook/dino-vits8", "dino-vitb8": "facebook/dino-vitb8"}
DINO_SIDE = 224  # DINO's training scale; the RGB preview it sees has the latent's resolution (1/8 of the image)
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}  # loaded DINO models by (name, folder): a model cache


def load_dino(name: str, folder: str) -> torch.nn.Module:
    """The DINO model ``name`` (a key of :data:`DINO_REPOS`): from ``folder/<name>`` when it holds a saved model,
    else from the Hugging Face hub into ``folder`` (the WebUI's ``models/dino``; offline: only what is there).
    A model that cannot be had raises a SettingsError naming ``yoda.source``."""
    if (name, folder) in _MODELS:
        return _MODELS[name, folder]
    field = FIELD_BY_KEY["yoda_source"]
    local = os.path.join(folder, name)
    try:
        if os.path.isfile(os.path.join(local, "config.json")):
            model = dino.load_model(local, local_files_only=True)
        else:
            offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
            log.info("[Attention Toolkit] fetching %s into %s (first use)", DINO_REPOS[name], folder)
            model = dino.load_model(DINO_REPOS[name], cache_dir=folder, local_files_only=offline)
    except ImportError as e:
        raise field.error(f"the DINO source needs the transformers package ({e}); choose source 'unet'") from None
    except Exception as e:  # no network, no files, a broken download: say what to do
        hint = ""
        if isinstance(e, AttributeError) and "NoneType" in str(e):
            hint = " (the WebUI's safe unpickler refused the .bin file, see the console: use model.safetensors)"
        raise field.error(
            f"could not load {DINO_REPOS[name]} ({type(e).__name__}: {str(e).splitlines()[0][:200]}){hint}. It is "
            f"downloaded on first use into {folder}; without network, save it there as {local} "
            "(config.json + model.safetensors), or choose source 'unet' (no extra model)"
        ) from None
    _MODELS[name, folder] = model
    return model


class YodaRun:
    """State of masked upscaling over one generation (all its batches and passes)."""

    def __init__(self, settings: Any, model: torch.nn.Module | None = None, services: Any = None):
        self.settings = settings
        self.services = services
        self.model = model
        self.plan: yd.YodaPlan | None = None
        self.previews: list[Image.Image] = []
        self._reset()

    @classmethod
    def prepare(cls, p: Any, settings: Settings, services: Any) -> YodaRun:
        y = settings.yoda
        if not getattr(p, "init_images", None) and not getattr(p, "enable_hr", False):
            raise FIELD_BY_KEY["yoda_enabled"].error(
                "in txt2img masked upscaling acts on the hires-fix pass: switch Hires. fix on (or use img2img)"
            )
        model = load_dino(y.source, services.models_dir("dino")) if y.source in DINO_REPOS else None
        return cls(y, model, services)

    def _reset(self) -> None:
        self.z0: Tensor | None = None
        self.noise: Tensor | None = None
        self.amap: Tensor | None = None  # (B, 1, h, w) normalized, at the latent grid
        self.mask: Tensor | None = None  # the current call's mask (B, 1, h, w)
        self.spent: Tensor | None = None  # sum of the masks so far (for the preview)
        self.calls = 0
        self._mask_call: int | None = None
        self._unet_sums: dict[int, list] = {}  # image -> [sum of (h, w) maps, count]

    @property
    def started(self) -> bool:
        return self.z0 is not None

    def begin_pass(self, plan: yd.YodaPlan | None) -> None:
        """A new sampling pass (first pass, hires pass, or another batch): its own source and map."""
        self.plan = plan
        self._reset()

    def start_pass(self, p: Any, z0: Tensor, noise: Tensor) -> None:
        """First call of a pass: the source latent (B, C, h, w) and the sampler's starting noise; the DINO map."""
        self.z0 = z0.detach().clone()
        self.noise = noise.detach().clone()
        if self.plan is not None and self.plan.source == "dino":
            self.amap = self.dino_map(self.services.latent_rgb(p, self.z0), tuple(z0.shape[-2:]))

    def dino_map(self, rgb: Tensor, latent_hw: tuple[int, int]) -> Tensor:
        """DINO [CLS] attention of images (B, 3, H, W) in [0, 1], brought to the latent grid: (B, 1, h, w).  The
        images are brought to a long side of :data:`DINO_SIDE` first (the preview has the latent's resolution)."""
        assert self.model is not None
        param = next(self.model.parameters())
        if rgb.device != param.device:
            self.model.to(rgb.device)
        f = DINO_SIDE / max(rgb.shape[-2:])
        size = (max(1, round(rgb.shape[-2] * f)), max(1, round(rgb.shape[-1] * f)))
        rgb = F.interpolate(rgb, size=size, mode="bicubic", align_corners=False, antialias=f < 1).clamp(0, 1)
        with torch.no_grad():
            grid = dino.attention_map(self.model, rgb, max_side=DINO_SIDE)
        return yd.normalize_map(yd.resize_map(grid, latent_hw))

    def add_unet(self, image: int, saliency: Tensor, hw: tuple[int, int]) -> None:
        """The "unet" source: one layer's per-token saliency (N,) of an image's first cond row, first call only."""
        if self.amap is not None:
            return
        grid = saliency.float().reshape(1, 1, *hw)
        entry = self._unet_sums.get(image)
        if entry is not None and entry[0].shape[-2:] != grid.shape[-2:]:
            grid = F.interpolate(grid, size=entry[0].shape[-2:], mode="bilinear", align_corners=False)
        if entry is None:
            self._unet_sums[image] = [grid, 1]
        else:
            entry[0] += grid
            entry[1] += 1

    def _unet_map(self, n_images: int, latent_hw: tuple[int, int]) -> Tensor | None:
        if len(self._unet_sums) < n_images:
            return None
        maps = [self._unet_sums[i][0] / self._unet_sums[i][1] for i in range(n_images)]
        grid = torch.cat([yd.resize_map(m, latent_hw) for m in maps])
        return yd.normalize_map(grid)

    def mask_for(self, call: int, total: int) -> Tensor | None:
        """The mask of model call ``call`` of ``total`` in this pass (computed once per call and kept for the
        preview); None while there is no map yet (the "unet" source before its first call's evaluation)."""
        if self.z0 is None or self.plan is None:
            return None
        if self._mask_call == call:
            return self.mask
        if self.amap is None:
            self.amap = self._unet_map(self.z0.shape[0], tuple(self.z0.shape[-2:]))
            if self.amap is None:
                return None
        m = self.plan.mask_at(self.amap, call, total).to(self.z0)
        self.mask, self._mask_call = m, call
        self.spent = m.clone() if self.spent is None else self.spent + m
        self.calls += 1
        return m

    def blend_input(self, x: Tensor, images: Sequence[int], noised: Tensor) -> Tensor:
        """Model-input rows ``x`` of images ``images``: outside this call's mask, ``noised``."""
        if self.mask is None:
            return x
        return yd.blend(x, noised.to(x), self.mask[list(images)].to(x))

    def blend_denoised(self, d: Tensor) -> Tensor:
        """The B images' x0 prediction: the source outside this call's mask."""
        if self.mask is None or self.z0 is None:
            return d
        return yd.blend(d, self.z0.to(d), self.mask.to(d))

    def finish_pass(self, fail: Any = None) -> None:
        """End of a pass: keep the previews when asked; a pass that never got a map fails (never silently)."""
        if self.plan is not None and self.z0 is not None and self.amap is None and fail is not None:
            fail(
                FIELD_BY_KEY["yoda_source"].error(
                    "no self-attention map reached the toolkit during the first step, so no mask was made"
                )
            )
        if self.settings.show and self.amap is not None and self.spent is not None and self.calls:
            share = self.spent / self.calls
            for a, s in zip(self.amap, share, strict=True):
                self.previews.append(_preview(a[0], s[0]))
        self.plan = None
        self._reset()

    def extra_images(self) -> list[Image.Image]:
        """What joins the generation's results: the images below when the section asks to show them."""
        return self.images() if self.settings.show else []

    def images(self) -> list[Image.Image]:
        return list(self.previews)


def _preview(amap: Tensor, share: Tensor, scale: int = 8) -> Image.Image:
    """One grayscale image at image size: the attention map, a gap, the share of steps each pixel was diffused."""
    h, w = amap.shape
    size = (h * scale, w * scale)
    panels = [
        F.interpolate(t[None, None].float().cpu(), size=size, mode="bilinear", align_corners=False)[0, 0]
        for t in (amap, share)
    ]
    gap = torch.ones(size[0], max(4, size[1] // 32))
    strip = torch.cat([panels[0], gap, panels[1]], dim=1).clamp(0, 1)
    return Image.fromarray((strip * 255).round().to(torch.uint8).numpy(), mode="L")
