"""``modules.extra_networks`` without any registered network: prompts pass through unchanged."""

from __future__ import annotations


def parse_prompts(prompts):
    return list(prompts), {}


def activate(p, extra_network_data):
    if p.scripts is not None:
        p.scripts.after_extra_networks_activate(
            p,
            batch_number=p.iteration,
            prompts=p.prompts,
            seeds=p.seeds,
            subseeds=p.subseeds,
            extra_network_data=extra_network_data,
        )


def deactivate(p, extra_network_data):
    return None
