"""Double of modules/prompt_parser.py: prompt-editing schedules (one level of ``[from:to:when]``),
``AND`` composition with ``:weight``, and batch reconstruction with dict conds for SDXL."""

import re
from collections import namedtuple

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])
ComposableScheduledPromptConditioning = namedtuple("ComposableScheduledPromptConditioning", ["schedules", "weight"])
MulticondLearnedConditioning = namedtuple("MulticondLearnedConditioning", ["shape", "batch"])

_EDIT = re.compile(r"\[([^\[\]:]*):([^\[\]:]*):([0-9.]+)\]")
_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^(.*?)(?::\s*([-+]?[0-9.]+))?\s*$", re.S)


class DictWithShape(dict):
    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


def get_learned_conditioning_prompt_schedules(prompts, steps):
    out = []
    for prompt in prompts:
        m = _EDIT.search(prompt)
        if m is None:
            out.append([[steps, prompt]])
            continue
        when = float(m.group(3))
        at = int(when * steps) if when < 1 else int(when)
        before = prompt[: m.start()] + m.group(1) + prompt[m.end():]
        after = prompt[: m.start()] + m.group(2) + prompt[m.end():]
        out.append([[at, before], [steps, after]] if 0 < at < steps else [[steps, after if at <= 0 else before]])
    return out


def _row(cond, i):
    if isinstance(cond, dict):
        return {k: v[i] for k, v in cond.items()}
    return cond[i]


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res = []
    cache = {}
    for prompt, schedule in zip(prompts, get_learned_conditioning_prompt_schedules(prompts, steps), strict=True):
        if prompt in cache:
            res.append(cache[prompt])
            continue
        texts = [text for _, text in schedule]
        conds = model.get_learned_conditioning(texts)
        cache[prompt] = [ScheduledPromptConditioning(end, _row(conds, i)) for i, (end, _) in enumerate(schedule)]
        res.append(cache[prompt])
    return res


def get_multicond_prompt_list(prompts):
    res_indexes, prompt_flat_list, prompt_indexes = [], [], {}
    for prompt in prompts:
        indexes = []
        for subprompt in _AND.split(prompt):
            m = _WEIGHT.match(subprompt)
            text, weight = (m.group(1).strip(), float(m.group(2))) if m and m.group(2) else (subprompt.strip(), 1.0)
            index = prompt_indexes.get(text)
            if index is None:
                index = len(prompt_flat_list)
                prompt_flat_list.append(text)
                prompt_indexes[text] = index
            indexes.append((index, weight))
        res_indexes.append(indexes)
    return res_indexes, prompt_flat_list, prompt_indexes


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res_indexes, prompt_flat_list, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, prompt_flat_list, steps)
    batch = [[ComposableScheduledPromptConditioning(learned[i], w) for i, w in idx] for idx in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def _pick(schedules, step):
    for s in schedules:
        if step <= s.end_at_step:
            return s.cond
    return schedules[-1].cond


def _stack(rows):
    if isinstance(rows[0], dict):
        return DictWithShape({k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    return torch.stack(rows)


def reconstruct_cond_batch(c, current_step):
    return _stack([_pick(schedules, current_step) for schedules in c])


def reconstruct_multicond_batch(c, current_step):
    rows, conds_list = [], []
    for composable_prompts in c.batch:
        conds_for_batch = []
        for composable in composable_prompts:
            conds_for_batch.append((len(rows), composable.weight))
            rows.append(_pick(composable.schedules, current_step))
        conds_list.append(conds_for_batch)

    def pad(t, n):  # A1111 pads shorter token sequences by repeating the last token vector
        return t if t.shape[0] == n else torch.vstack([t, t[-1:].repeat(n - t.shape[0], 1)])

    if isinstance(rows[0], dict):
        n = max(r["crossattn"].shape[0] for r in rows)
        rows = [{**r, "crossattn": pad(r["crossattn"], n)} for r in rows]
    else:
        n = max(r.shape[0] for r in rows)
        rows = [pad(r, n) for r in rows]
    return conds_list, _stack(rows)
