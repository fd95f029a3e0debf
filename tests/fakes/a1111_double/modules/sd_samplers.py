from modules import sd_samplers_kdiffusion, sd_samplers_timesteps

all_samplers = [*sd_samplers_kdiffusion.SAMPLERS, "DDIM"]


def create_sampler(name, model):
    if name == "DDIM":
        return sd_samplers_timesteps.CompVisSampler(name, model)
    if name not in sd_samplers_kdiffusion.SAMPLERS:
        raise ValueError(f"bad sampler name: {name}")
    return sd_samplers_kdiffusion.KDiffusionSampler(name, model)
