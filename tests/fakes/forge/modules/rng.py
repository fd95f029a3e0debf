"""``modules.rng`` (CPU): per-image noise from ``torch.Generator('cpu').manual_seed(seed)``."""

from __future__ import annotations

import torch
from modules import devices, shared


def manual_seed(seed):
    torch.manual_seed(seed)


def randn(seed, shape, generator=None):
    # Forge reseeds the global generator too (differently when a per-image generator is given).
    manual_seed((seed + 100000) % 65536 if generator is not None else seed)
    return torch.randn(shape, device=devices.cpu, generator=generator).to(devices.device)


def randn_local(seed, shape):
    generator = torch.Generator(devices.cpu).manual_seed(int(seed))
    return torch.randn(shape, device=devices.cpu, generator=generator).to(devices.device)


def randn_like(x):
    return torch.randn_like(x, device=devices.cpu).to(x.device)


def randn_without_seed(shape, generator=None):
    return torch.randn(shape, device=devices.cpu, generator=generator).to(devices.device)


def create_generator(seed):
    return torch.Generator(devices.cpu).manual_seed(int(seed))


def slerp(val, low, high):
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


class ImageRNG:
    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0):
        self.shape = tuple(map(int, shape))
        self.seeds = seeds
        self.subseeds = subseeds
        self.subseed_strength = subseed_strength
        self.seed_resize_from_h = seed_resize_from_h
        self.seed_resize_from_w = seed_resize_from_w
        self.generators = [create_generator(seed) for seed in seeds]
        self.is_first = True

    def first(self):
        xs = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators, strict=False)):
            noise = randn(seed, self.shape, generator=generator)
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = 0 if i >= len(self.subseeds) else self.subseeds[i]
                noise = slerp(self.subseed_strength, noise, randn(subseed, self.shape))
            xs.append(noise)
        delta = shared.opts.eta_noise_seed_delta or 0
        if delta:
            self.generators = [create_generator(seed + delta) for seed in self.seeds]
        return torch.stack(xs).to(shared.device)

    def next(self):
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([randn_without_seed(self.shape, generator=g) for g in self.generators]).to(shared.device)
