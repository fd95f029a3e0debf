"""Forge's condition objects: how conds of several chunks are batched into one model call."""

from __future__ import annotations

import math

import torch


def repeat_to_batch_size(tensor, batch_size):
    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    if tensor.shape[0] < batch_size:
        reps = [math.ceil(batch_size / tensor.shape[0])] + [1] * (tensor.ndim - 1)
        return tensor.repeat(reps)[:batch_size]
    return tensor


class Condition:
    def __init__(self, cond):
        self.cond = cond

    def _copy_with(self, cond):
        return self.__class__(cond)

    def process_cond(self, batch_size, device, **kwargs):
        return self._copy_with(repeat_to_batch_size(self.cond, batch_size).to(device))

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def concat(self, others):
        return torch.cat([self.cond] + [o.cond for o in others])


class ConditionCrossAttn(Condition):
    """Token lengths may differ if one is a small multiple of the other; shorter ones are repeated."""

    def can_concat(self, other):
        s1, s2 = self.cond.shape, other.cond.shape
        if s1 == s2:
            return True
        if s1[0] != s2[0] or s1[2] != s2[2]:
            return False
        return math.lcm(s1[1], s2[1]) // min(s1[1], s2[1]) <= 4

    def concat(self, others):
        conds = [self.cond] + [o.cond for o in others]
        length = 1
        for c in conds:
            length = math.lcm(length, c.shape[1])
        return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in conds])


class ConditionConstant(Condition):
    def process_cond(self, batch_size, device, **kwargs):
        return self._copy_with(self.cond)

    def can_concat(self, other):
        return self.cond == other.cond

    def concat(self, others):
        return self.cond


def compile_conditions(cond):
    """A1111 cond (tensor, or dict with crossattn/vector[/guidance]) -> list with one Forge cond dict."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return [{"cross_attn": cond, "model_conds": {"c_crossattn": ConditionCrossAttn(cond)}}]
    result = {
        "cross_attn": cond["crossattn"],
        "pooled_output": cond["vector"],
        "model_conds": {"c_crossattn": ConditionCrossAttn(cond["crossattn"]), "y": Condition(cond["vector"])},
    }
    if "guidance" in cond:
        result["model_conds"]["guidance"] = Condition(cond["guidance"])
    return [result]


def compile_weighted_conditions(cond, weights):
    """One Forge cond per sub-prompt position (``AND``), holding that position's row of every image;
    its ``strength`` is the weight of the last image at that position."""
    results = []
    for position in map(list, zip(*weights, strict=False)):
        indices = [i for i, _ in position]
        weight = position[-1][1] if position else 0
        feed = cond.advanced_indexing(indices) if hasattr(cond, "advanced_indexing") else cond[indices]
        compiled = compile_conditions(feed)
        compiled[0]["strength"] = weight
        results += compiled
    return results
