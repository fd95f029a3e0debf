"""Automatic edit mask: the per-generation run around sampling (shared by the A1111 and Forge adapters).

* ``start`` (first step of a batch): the prompt words of each image (the host's own tokenizer gives each
  word's token positions), the source latent (img2img's init latent) and the noise the sampler started from.
* ``add``: the cross-attention probabilities of one image's cond row at one layer (also the rows of the extra
  noise draws, with *Seeds* above 1: ``redrawn`` gives their model inputs).
* ``update``: after the step's model call, every image's instant mask from the maps so far.
* ``blend_input`` / ``blend_denoised``: the source outside the mask, in the model input and in the prediction.
* ``finish_batch`` / ``images``: the final masks, returned as extra output images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from lib_attn.methods.edit_mask import core as em
from lib_attn.settings import FIELD_BY_KEY, Settings

Tensor = torch.Tensor


def token_counter(sd_model: Any) -> Callable[[str], int]:
    """How many tokens the loaded model's CLIP tokenizer makes of a text (no BOS/EOS): A1111's
    ``cond_stage_model.tokenize`` (SD1/SD2) or its SDXL embedders', Forge's text processing engines."""
    candidates = [
        getattr(sd_model, "cond_stage_model", None),
        getattr(sd_model, "text_processing_engine", None),
        getattr(sd_model, "text_processing_engine_l", None),
        *getattr(getattr(sd_model, "conditioner", None), "embedders", ()),
    ]
    for obj in candidates:
        tokenize = getattr(obj, "tokenize", None)
        if callable(tokenize):
            return lambda text, _t=tokenize: len(_t([text])[0])
    raise FIELD_BY_KEY["edit_mask_enabled"].error(
        f"the loaded model ({type(sd_model).__name__}) has no CLIP tokenizer the edit mask can read"
    )


class EditMaskRun:
    """State of the automatic edit mask over one generation (all its batches)."""

    def __init__(self, settings: Any, p: Any = None, services: Any = None, checkpoint: str | None = None):
        self.settings = settings
        self.p, self.services = p, services
        self.checkpoint = checkpoint  # the final pass's inpainting checkpoint (its WebUI title), None: the loaded model
        self.plan: em.EditMaskPlan | None = None
        self.results: list[Tensor] = []  # final (h, w) masks of every image so far, in output order
        self.sizes: list[tuple[int, int]] = []  # the image size of each result
        self.final: Tensor | None = None  # the last batch's final masks (B, 1, h, w)
        self._reset()

    @classmethod
    def prepare(cls, p: Any, settings: Settings, services: Any = None) -> EditMaskRun:
        if not getattr(p, "init_images", None):
            raise FIELD_BY_KEY["edit_mask_enabled"].error(
                "the automatic edit mask works in img2img (it keeps the init image outside the mask)"
            )
        e, checkpoint = settings.edit_mask, None
        if e.final == "inpaint" and e.inpaint_model.strip():
            checkpoint = services.find_checkpoint(e.inpaint_model.strip()) if services is not None else None
            if checkpoint is None:
                raise FIELD_BY_KEY["edit_mask_inpaint_model"].error(
                    f"no checkpoint named {e.inpaint_model.strip()!r} in the WebUI's list"
                )
        return cls(e, p, services, checkpoint)

    @property
    def inpaints_in_place(self) -> bool:
        """The final pass samples once more inside the generation (the loaded model), not per image afterwards."""
        return self.settings.final == "inpaint" and self.checkpoint is None

    def finish_image(self, index: int, image: Image.Image) -> Image.Image:
        """With an inpainting checkpoint: image ``index`` of the batch re-rendered by it inside the final mask."""
        if self.checkpoint is None or self.final is None or index >= self.final.shape[0]:
            return image
        mask = mask_image(self.final[index, 0].detach().float().cpu(), image.size)
        return self.services.masked_img2img(self.p, index, mask, self.checkpoint)

    def _reset(self) -> None:
        self.builders: list[em.MaskBuilder] | None = None
        self.z0: Tensor | None = None
        self.noise: Tensor | None = None
        self.draws: Tensor | None = None  # (seeds - 1, B, C, h, w): the extra noise draws of each image
        self.mask: Tensor | None = None  # (B, 1, h, w) after the last step
        self.history: list[Tensor] = []  # the mask after each step (the model input of the next step used it)

    def begin_batch(self) -> None:
        """Each sampling call (one batch) builds its own masks."""
        self._reset()

    @property
    def started(self) -> bool:
        return self.builders is not None

    @staticmethod
    def prompts(p: Any, n_images: int) -> list[str]:
        """The prompt of each image of the batch (the processing's own list, else its one prompt for all)."""
        prompts = list(getattr(p, "prompts", None) or [])[:n_images]
        return prompts if len(prompts) == n_images else [str(getattr(p, "prompt", ""))] * n_images

    @staticmethod
    def seeds(p: Any, n_images: int) -> list[int]:
        """The generation seed of each image of the batch (the processing's ``seeds``, else its first seed + i)."""
        seeds = [int(s) for s in list(getattr(p, "seeds", None) or [])[:n_images]]
        if len(seeds) == n_images:
            return seeds
        first = getattr(p, "seed", None)
        first = int(first) if isinstance(first, (int, float)) and first >= 0 else 0
        return [first + i for i in range(n_images)]

    @property
    def extra_draws(self) -> int:
        """Noise draws beyond the sampler's own at each step (Seeds - 1; 0 before the batch started)."""
        return 0 if self.draws is None else int(self.draws.shape[0])

    def start(
        self,
        prompts: Sequence[str],
        count_tokens: Callable[[str], int],
        z0: Tensor,
        noise: Tensor,
        seeds: Sequence[int] = (),
    ) -> None:
        """First step of a batch: words per image, the source latent, the sampler's starting noise and, with Seeds
        above 1, the extra noise draws from each image's seed (``seeds``)."""
        plan = self.plan
        assert plan is not None
        forced = self.settings.word_list
        builders = []
        for i, prompt in enumerate(prompts):
            groups = em.word_groups(em.prompt_pieces(prompt), count_tokens)
            words = {w for w, _ in groups}
            if not groups:
                raise FIELD_BY_KEY["edit_mask_enabled"].error(
                    f"the prompt of image {i} has no words to build a mask from"
                )
            missing = [w for w in forced if w not in words]
            if missing:
                raise FIELD_BY_KEY["edit_mask_words"].error(
                    f"{', '.join(missing)} not in the prompt's first 75 tokens ({', '.join(sorted(words))})"
                )
            builders.append(em.MaskBuilder(plan, groups, forced))
        if plan.batch_average and builders:
            shared = builders[0]
            if any([w for w, _ in b.groups] != [w for w, _ in shared.groups] for b in builders):
                raise FIELD_BY_KEY["edit_mask_batch_average"].error(
                    "one mask for the batch needs the same prompt for every image"
                )
            builders = [shared] * len(builders)
        self.builders = builders
        self.z0 = z0.detach().clone()
        self.noise = noise.detach().clone()
        self.draws = None
        if plan.seeds > 1:
            seeds = list(seeds) or [0] * len(prompts)
            self.draws = em.draw_noise(seeds, tuple(z0.shape[1:]), plan.seeds).to(self.noise)

    def redrawn(self, x: Tensor, noised: Callable[[Tensor], Tensor]) -> Tensor:
        """The model inputs of the extra draws, ``(draws * B, ...)`` draw-major (row ``k * B + i``: image i), from
        ``x`` (the step's B first-cond inputs after the blend) and ``noised(noise)`` (the source brought to this
        step's level with that noise, per image)."""
        assert self.draws is not None and self.noise is not None
        base = noised(self.noise.to(x))
        redrawn = torch.stack([noised(d.to(x)) for d in self.draws])
        return em.redrawn_inputs(x, base, redrawn)

    def add(self, image: int, probs: Tensor, hw: tuple[int, int]) -> None:
        if self.builders is not None and image < len(self.builders):
            self.builders[image].sums.add(probs, hw)

    def update(self, latent_hw: tuple[int, int]) -> Tensor | None:
        """Every image's mask from the maps so far: (B, 1, h, w) float32, or None before any map."""
        if self.builders is None:
            return None
        masks, cache = [], {}
        for b in self.builders:
            if id(b) not in cache:
                cache[id(b)] = b.mask(latent_hw)
            masks.append(cache[id(b)])
        if any(m is None for m in masks):
            return self.mask
        self.mask = torch.stack(masks)[:, None]
        self.history.append(self.mask)
        return self.mask

    def blend_input(self, x: Tensor, images: Sequence[int], noised: Tensor) -> Tensor:
        """Model-input rows ``x`` (their images ``images``; ``noised`` the source noised to each row's level)."""
        if self.mask is None:
            return x
        m = self.mask[list(images)].to(x)
        return em.blend(x, noised.to(x), m)

    def blend_denoised(self, d: Tensor) -> Tensor:
        """The x0 prediction of the B images: the source outside the mask."""
        if self.mask is None or self.z0 is None:
            return d
        return em.blend(d, self.z0.to(d), self.mask.to(d))

    def finish_batch(self, image_size: tuple[int, int], fail: Callable[[Exception], None] | None = None) -> None:
        """End of a batch's sampling: keep the final masks; a run whose steps never got a map fails (never silently).
        A sampling call that made no model call at all (A1111's DDIM at a very low strength) has nothing to mask."""
        if self.mask is None and self.builders is not None and fail is not None:
            fail(
                FIELD_BY_KEY["edit_mask_layers"].error(
                    "no cross-attention map reached the mask layers during sampling, so no mask was made"
                )
            )
        self.final = self.mask
        if self.mask is not None:
            self.results.extend(m[0].detach().float().cpu() for m in self.mask)
            self.sizes.extend([image_size] * self.mask.shape[0])
        self._reset()

    @contextlib.contextmanager
    def inpainting(self, p: Any) -> Iterator[None]:
        """Scope of the optional final pass: the host's own img2img sampling runs again as an inpainting run with
        the final masks: ``p.mask`` / ``p.nmask`` (1 = keep / regenerate, broadcast over the batch) and the
        image conditioning built by the host from the init image (decoded from the init latent, so crops and
        resize modes match) and the mask at image size.  Everything is put back afterwards."""
        m = self.final
        z0 = getattr(p, "init_latent", None)
        if m is None or not isinstance(z0, Tensor):
            yield
            return
        saved = {k: getattr(p, k, None) for k in ("mask", "nmask", "image_conditioning")}
        m = m.round().to(z0)  # the host's masks are binary (mask_round)
        try:
            with torch.no_grad():
                source = p.sd_model.decode_first_stage(z0).clamp(-1, 1)
                full = F.interpolate(m.float(), size=source.shape[-2:], mode="nearest").to(source)
                p.image_conditioning = p.img2img_image_conditioning(source, z0, full, True)
            p.mask, p.nmask = 1.0 - m, m
            yield
        finally:
            for k, v in saved.items():
                setattr(p, k, v)

    def extra_images(self) -> list[Image.Image]:
        """What joins the generation's results: the images below when the section asks to show them."""
        return self.images() if self.settings.show else []

    def images(self) -> list[Image.Image]:
        """The final masks as grayscale images at the output size (white = edited), usable as an img2img mask."""
        return [mask_image(m, size) for m, size in zip(self.results, self.sizes, strict=True)]


def mask_image(m: Tensor, size: tuple[int, int]) -> Image.Image:
    """A final mask (h, w) as a grayscale image of ``size`` (w, h), bilinearly resized (white = edited)."""
    up = F.interpolate(m[None, None], size=(size[1], size[0]), mode="bilinear", align_corners=False)[0, 0]
    return Image.fromarray((up.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), mode="L")
