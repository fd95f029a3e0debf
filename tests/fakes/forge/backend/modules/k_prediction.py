"""Sigma <-> timestep conversion and the epsilon / v / flow parameterizations (``backend.modules.k_prediction``)."""

from __future__ import annotations

import torch


class AbstractPrediction(torch.nn.Module):
    def __init__(self, sigma_data=1.0, prediction_type="epsilon"):
        super().__init__()
        assert prediction_type in ("epsilon", "const", "v_prediction", "edm")
        self.sigma_data = sigma_data
        self.prediction_type = prediction_type

    def calculate_input(self, sigma, noise):
        if self.prediction_type == "const":
            return noise
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        sd2 = self.sigma_data**2
        if self.prediction_type == "v_prediction":
            return (
                model_input * sd2 / (sigma**2 + sd2) - model_output * sigma * self.sigma_data / (sigma**2 + sd2) ** 0.5
            )
        if self.prediction_type == "edm":
            return (
                model_input * sd2 / (sigma**2 + sd2) + model_output * sigma * self.sigma_data / (sigma**2 + sd2) ** 0.5
            )
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        if self.prediction_type == "const":
            return sigma * noise + (1.0 - sigma) * latent_image
        noise = noise * torch.sqrt(1.0 + sigma**2.0) if max_denoise else noise * sigma
        return noise + latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1.0 - sigma) if self.prediction_type == "const" else latent


class Prediction(AbstractPrediction):
    """Discrete DDPM schedule given by ``alphas_cumprod`` (SD1/SD2/SDXL)."""

    def __init__(self, alphas_cumprod, prediction_type="epsilon", sigma_data=1.0):
        super().__init__(sigma_data=sigma_data, prediction_type=prediction_type)
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        sigmas = ((1 - ac) / ac) ** 0.5
        self.register_buffer("alphas_cumprod", ac.float())
        self.set_sigmas(sigmas)

    def set_sigmas(self, sigmas):
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        """Nearest discrete timestep (Forge rounds; k-diffusion's CompVisDenoiser interpolates)."""
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=len(self.sigmas) - 1)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp().to(timestep.device)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


class PredictionFlow(AbstractPrediction):
    """Rectified-flow schedule (Flux / SD3 stand-in)."""

    def __init__(self, shift=1.0, multiplier=1000, timesteps=1000):
        super().__init__(sigma_data=1.0, prediction_type="const")
        self.shift = shift
        self.multiplier = multiplier
        self.register_buffer("sigmas", self.sigma(torch.arange(1, timesteps + 1) / timesteps * multiplier))

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        t = timestep / self.multiplier
        return t if self.shift == 1.0 else self.shift * t / (1 + (self.shift - 1) * t)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return 1.0 - percent
