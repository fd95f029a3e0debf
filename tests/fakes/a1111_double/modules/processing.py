"""Double of modules/processing.py (A1111 1.10): the call order of host-contract.md section 1.3, txt2img with
hires fix (latent or image upscaler, own sampler/steps/prompt/checkpoint), img2img with masks, infotext."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from modules import devices, prompt_parser, sd_models, sd_samplers, shared
from modules.shared import state
from PIL import Image


def create_noise(seeds, shape):
    """One noise tensor per image, each from its own seed (CPU generator), like A1111's ImageRNG."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
        shared.sd_model.device, shared.sd_model.dtype
    )


def _quote(v):
    text = str(v)
    return json.dumps(text) if ("," in text or ":" in text or '"' in text) else text


def create_infotext(p, index=0):
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": p.all_seeds[index],
              "Size": f"{p.width}x{p.height}", **p.extra_generation_params}
    if getattr(p, "enable_hr", False):
        params.update({"Denoising strength": p.denoising_strength, "Hires upscale": p.hr_scale,
                       "Hires upscaler": p.hr_upscaler})
    body = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    neg = f"\nNegative prompt: {p.all_negative_prompts[index]}" if p.all_negative_prompts[index] else ""
    return f"{p.all_prompts[index]}{neg}\n{body}"


class Processed:
    def __init__(self, p, images, samples, infotexts):
        self.images = images
        self.samples = samples
        self.infotexts = infotexts
        self.info = infotexts[0] if infotexts else ""
        self.extra_generation_params = dict(p.extra_generation_params)
        self.seed = p.all_seeds[0] if p.all_seeds else None
        self.extra_images = []
        self.comments = ""

    def js(self):
        return json.dumps({"infotexts": self.infotexts, "extra_generation_params": self.extra_generation_params})


class StableDiffusionProcessing:
    def __init__(self, prompt="", negative_prompt="", seed=1, steps=4, cfg_scale=7.0, width=64, height=64,
                 batch_size=1, n_iter=1, sampler_name="Euler", scripts=None, script_args=None, s_min_uncond=0.0,
                 refiner_checkpoint=None, refiner_switch_at=None, override_settings=None, **kwargs):
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.steps = steps
        self.cfg_scale = cfg_scale
        self.width = width
        self.height = height
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.sampler_name = sampler_name
        self.scripts = scripts
        self.script_args = list(script_args or [])
        self.s_min_uncond = s_min_uncond
        self.refiner_checkpoint_info = sd_models.get_closet_checkpoint_match(refiner_checkpoint) if refiner_checkpoint else None
        self.refiner_switch_at = refiner_switch_at
        self.override_settings = override_settings or {}
        self.override_settings_restore_afterwards = kwargs.pop("override_settings_restore_afterwards", True)
        self.extra_generation_params = {}
        self.is_api = False
        self.is_hr_pass = False
        self.iteration = 0
        self.c = self.uc = None
        for k, v in kwargs.items():
            setattr(self, k, v)

    @property
    def sd_model(self):
        return shared.sd_model

    def setup_prompts(self):
        n = self.batch_size * self.n_iter
        self.all_prompts = self.prompt if isinstance(self.prompt, list) else [self.prompt] * n
        neg = self.negative_prompt
        self.all_negative_prompts = neg if isinstance(neg, list) else [neg] * n
        self.all_seeds = [int(self.seed) + i for i in range(n)]

    def setup_conds(self):
        self.uc = prompt_parser.get_learned_conditioning(self.sd_model, self.negative_prompts, self.steps)
        self.c = prompt_parser.get_multicond_learned_conditioning(self.sd_model, self.prompts, self.steps)

    def txt2img_image_conditioning(self, x, width=None, height=None):
        """As A1111's: an inpainting model gets a full mask and a zero image; other models a dummy."""
        if getattr(self.sd_model, "inpainting", False):
            return torch.cat([torch.ones_like(x[:, :1]), x * 0], dim=1)
        return x.new_zeros(x.shape[0], 5, 1, 1)

    def img2img_image_conditioning(self, source_image, latent_image, image_mask=None, round_image_mask=True):
        """As A1111's ``inpainting_image_conditioning`` for inpainting models (the mask, tensor or PIL, and the
        encoded source with the masked part zeroed), else a dummy.  ``source_image`` is in [-1, 1]."""
        if not getattr(self.sd_model, "inpainting", False):
            return latent_image.new_zeros(latent_image.shape[0], 5, 1, 1)
        if image_mask is None:
            m = source_image.new_ones(1, 1, *source_image.shape[-2:])
        elif torch.is_tensor(image_mask):
            m = image_mask
        else:
            m = torch.from_numpy(np.asarray(image_mask.convert("L"), dtype=np.float32)[None, None] / 255.0)
            if round_image_mask:
                m = torch.round(m)
        m = m.to(source_image)
        z = self.sd_model.get_first_stage_encoding(self.sd_model.encode_first_stage(source_image * (1.0 - m)))
        m = F.interpolate(m, size=latent_image.shape[-2:]).expand(z.shape[0], -1, -1, -1)
        return torch.cat([m, z], dim=1).to(latent_image)

    def init(self, all_prompts, all_seeds):
        pass

    def close(self):
        pass


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, enable_hr=False, denoising_strength=0.5, hr_scale=2.0, hr_upscaler="Latent",
                 hr_second_pass_steps=0, hr_checkpoint_name=None, hr_sampler_name=None, hr_prompt="",
                 hr_negative_prompt="", **kwargs):
        super().__init__(**kwargs)
        self.enable_hr = enable_hr
        self.denoising_strength = denoising_strength
        self.hr_scale = hr_scale
        self.hr_upscaler = hr_upscaler
        self.hr_second_pass_steps = hr_second_pass_steps
        self.hr_checkpoint_name = hr_checkpoint_name
        self.hr_checkpoint_info = sd_models.get_closet_checkpoint_match(hr_checkpoint_name) if hr_checkpoint_name else None
        self.hr_sampler_name = hr_sampler_name
        self.hr_prompt = hr_prompt
        self.hr_negative_prompt = hr_negative_prompt
        self.hr_c = self.hr_uc = None

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        x = create_noise(seeds, (4, self.height // 8, self.width // 8))
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning,
                                      image_conditioning=self.txt2img_image_conditioning(x))
        if not self.enable_hr or state.interrupted:
            return samples
        if self.hr_checkpoint_info is not None:
            sd_models.reload_model_weights(info=self.hr_checkpoint_info)
        return self.sample_hr_pass(samples, seeds)

    def calculate_hr_conds(self):
        prompts = [self.hr_prompt] * len(self.prompts) if self.hr_prompt else self.prompts
        negs = [self.hr_negative_prompt] * len(self.prompts) if self.hr_negative_prompt else self.negative_prompts
        steps = self.hr_second_pass_steps or self.steps
        self.hr_uc = prompt_parser.get_learned_conditioning(self.sd_model, negs, steps)
        self.hr_c = prompt_parser.get_multicond_learned_conditioning(self.sd_model, prompts, steps)

    def sample_hr_pass(self, samples, seeds):
        self.is_hr_pass = True
        tw, th = int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        if self.hr_upscaler.startswith("Latent"):
            samples = F.interpolate(samples, size=(th // 8, tw // 8), mode="bilinear")
        else:  # an image upscaler: decode, resize, encode
            img = self.sd_model.decode_first_stage(samples)
            img = F.interpolate(img, size=(th // 8 * 8, tw // 8 * 8), mode="bicubic").clamp(-1, 1)
            samples = self.sd_model.get_first_stage_encoding(self.sd_model.encode_first_stage(img))
        self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        noise = create_noise([s + 1000 for s in seeds], samples.shape[1:])
        self.calculate_hr_conds()
        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                              steps=self.hr_second_pass_steps or self.steps,
                                              image_conditioning=self.txt2img_image_conditioning(samples))
        self.is_hr_pass = False
        return samples


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, init_images=None, mask=None, denoising_strength=0.75, inpainting_fill=1, **kwargs):
        super().__init__(**kwargs)
        self.init_images = init_images or []
        self.image_mask = mask
        self.mask = None
        self.nmask = None
        self.denoising_strength = denoising_strength
        self.inpainting_fill = inpainting_fill
        self.init_latent = None
        self.image_conditioning = None
        self.resize_mode = 0  # "Just resize"
        self.color_corrections = None

    def init(self, all_prompts, all_seeds):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)  # A1111 1.10: in init
        imgs = []
        for im in self.init_images:
            im = im.convert("RGB").resize((self.width, self.height), Image.LANCZOS)
            imgs.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        batch = torch.stack(imgs).to(devices.device, self.sd_model.dtype)
        if batch.shape[0] == 1:
            batch = batch.repeat(self.batch_size, 1, 1, 1)
        self.init_latent = self.sd_model.get_first_stage_encoding(self.sd_model.encode_first_stage(batch))
        if self.image_mask is not None:
            h, w = self.init_latent.shape[2:]
            m = self.image_mask.convert("L").resize((w, h), Image.LANCZOS)
            latmask = np.around(np.asarray(m, dtype=np.float32) / 255.0)
            latmask = torch.from_numpy(np.tile(latmask[None], (self.init_latent.shape[1], 1, 1))).to(self.init_latent)
            self.mask = 1.0 - latmask  # 1 = keep the original
            self.nmask = latmask  # 1 = regenerate
        image_mask = None
        if self.image_mask is not None:
            image_mask = self.image_mask.convert("L").resize((self.width, self.height), Image.LANCZOS)
        self.image_conditioning = self.img2img_image_conditioning(batch, self.init_latent, image_mask, True)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        x = create_noise(seeds, self.init_latent.shape[1:])
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=self.init_latent, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        samples = self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning,
                                              image_conditioning=self.image_conditioning)
        if self.mask is not None:
            samples = samples * self.nmask + self.init_latent * self.mask
        return samples


_depth = [0]  # state.begin/end stand for the UI's / API's job wrapper: only around the outermost call


def process_images(p):
    """As A1111 1.10: ``override_settings`` set as options for this call (a checkpoint override loads that
    checkpoint; an unknown or absent one loads the option's), put back afterwards with
    ``override_settings_restore_afterwards`` (the option only: A1111 leaves the override's model loaded)."""
    from modules import sd_models

    outer = _depth[0] == 0
    if outer:
        state.begin()
    _depth[0] += 1
    if p.scripts is not None:
        p.scripts.before_process(p)
    stored = {k: getattr(shared.opts, k) for k in p.override_settings if hasattr(shared.opts, k)}
    try:
        if sd_models.get_closet_checkpoint_match(p.override_settings.get("sd_model_checkpoint")) is None:
            p.override_settings.pop("sd_model_checkpoint", None)
            sd_models.reload_model_weights()
        for k, v in p.override_settings.items():
            setattr(shared.opts, k, v)
            if k == "sd_model_checkpoint":
                sd_models.reload_model_weights()
        return process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored.items():
                setattr(shared.opts, k, v)
        _depth[0] -= 1
        if outer:
            state.end()


def process_images_inner(p):
    from modules import scripts

    p.setup_prompts()
    images, all_samples, infotexts = [], [], []
    with torch.no_grad():
        if p.scripts is not None:
            p.scripts.process(p)
        p.init(p.all_prompts, p.all_seeds)
        for n in range(p.n_iter):
            p.iteration = n
            if state.interrupted:
                break
            sl = slice(n * p.batch_size, (n + 1) * p.batch_size)
            p.prompts, p.negative_prompts, p.seeds = p.all_prompts[sl], p.all_negative_prompts[sl], p.all_seeds[sl]
            p.subseeds = p.seeds
            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
            p.setup_conds()
            samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, subseeds=p.subseeds,
                               subseed_strength=0.0, prompts=p.prompts)
            if p.scripts is not None:
                ps = scripts.PostSampleArgs(samples)
                p.scripts.post_sample(p, ps)
                samples = ps.samples
            decoded = ((p.sd_model.decode_first_stage(samples) + 1.0) / 2.0).clamp(0, 1)
            if p.scripts is not None:
                p.scripts.postprocess_batch(p, decoded, batch_number=n)
            for i in range(decoded.shape[0]):
                p.batch_index = i
                arr = (decoded[i].permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
                image = Image.fromarray(arr)
                if p.scripts is not None:
                    pp = scripts.PostprocessImageArgs(image)
                    p.scripts.postprocess_image(p, pp)
                    image = pp.image
                images.append(image)
                infotexts.append(create_infotext(p, n * p.batch_size + i))
            all_samples.append(samples)
        res = Processed(p, images, torch.cat(all_samples) if all_samples else None, infotexts)
        if p.scripts is not None:
            p.scripts.postprocess(p, res)
    return res
