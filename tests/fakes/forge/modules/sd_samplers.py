"""``modules.sd_samplers``: the k-diffusion samplers of the double."""

from __future__ import annotations

import logging

from modules import sd_samplers_common, sd_samplers_kdiffusion, sd_schedulers  # noqa: F401
from modules.sd_samplers_common import sample_to_image  # noqa: F401

logger = logging.getLogger(__name__)

all_samplers = [*sd_samplers_kdiffusion.samplers_data_k_diffusion]
all_samplers_map = {x.name: x for x in all_samplers}
samplers = all_samplers
samplers_for_img2img = all_samplers
samplers_map = {}
for _s in all_samplers:
    samplers_map[_s.name.lower()] = _s.name
    for _alias in _s.aliases:
        samplers_map[_alias.lower()] = _s.name


def find_sampler_config(name):
    if name is not None:
        return all_samplers_map.get(name)
    return all_samplers[0]


def create_sampler(name, model):
    config = find_sampler_config(name)
    assert config is not None, f"bad sampler name: {name}"
    sampler = config.constructor(model)
    sampler.config = config
    return sampler


def visible_sampler_names():
    return [x.name for x in all_samplers]


def get_sampler_from_infotext(d: dict):
    return get_sampler_and_scheduler(d.get("Sampler"), d.get("Schedule type"))[0]


def get_scheduler_from_infotext(d: dict):
    return get_sampler_and_scheduler(d.get("Sampler"), d.get("Schedule type"))[1]


def get_sampler_and_scheduler(sampler_name, scheduler_name, *, convert_automatic=True):
    default_sampler = samplers[0]
    found_scheduler = sd_schedulers.schedulers_map.get(scheduler_name, sd_schedulers.schedulers[0])
    name = sampler_name or default_sampler.name
    for scheduler in sd_schedulers.schedulers:
        for option in (scheduler.label, scheduler.name, *(scheduler.aliases or [])):
            if name.endswith(" " + option):
                found_scheduler = scheduler
                name = name[: -(len(option) + 1)]
                break
    sampler = all_samplers_map.get(name, default_sampler)
    if convert_automatic and sampler.options.get("scheduler", None) == found_scheduler.name:
        found_scheduler = sd_schedulers.schedulers[0]
    return sampler.name, found_scheduler.label


def fix_p_invalid_sampler_and_scheduler(p):
    i_sampler, i_scheduler = p.sampler_name, p.scheduler
    p.sampler_name, p.scheduler = get_sampler_and_scheduler(p.sampler_name, p.scheduler, convert_automatic=False)
    if p.sampler_name != i_sampler or i_scheduler != p.scheduler:
        logger.warning(
            f'Sampler Scheduler autocorrection: "{i_sampler}" -> "{p.sampler_name}", "{i_scheduler}" -> "{p.scheduler}"'
        )
