"""Prompt parsing of the host (modules/prompt_parser.py): emphasis, BREAK, AND, cond batches.

Prompt editing and alternation (`[a:b:5]`, `[a|b]`) are not reproduced: such text is encoded
as written (see tests/host/README.md).
"""

from __future__ import annotations

import re
from collections import namedtuple

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])


class SdConditioning(list):
    """A list of prompts that remembers the image size and whether it holds negative prompts."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


# --- emphasis --------------------------------------------------------------------------------------
_PIECE = re.compile(
    r"(?P<escaped>\\[()\[\]\\]?)"          # literal bracket or backslash; a lone one vanishes
    r"|(?P<weight_close>:\s*(?P<w>[+-]?[.\d]+)\s*\))"  # ':1.3)' closes a round group with a weight
    r"|(?P<open>[(\[])"
    r"|(?P<close>[)\]])"
    r"|(?P<text>[^\\()\[\]:]+|:)"
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_UP, _DOWN = 1.1, 1 / 1.1


def parse_prompt_attention(text: str) -> list[list]:
    """Split a prompt into [text, weight] runs; ["BREAK", -1] marks a forced chunk break."""
    runs: list[list] = []
    stacks: dict[str, list[int]] = {"(": [], "[": []}

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _PIECE.finditer(text):
        if m.group("escaped"):
            runs.append([m.group("escaped")[1:], 1.0])
        elif m.group("open"):
            stacks[m.group("open")].append(len(runs))
        elif m.group("weight_close") and stacks["("]:
            scale(stacks["("].pop(), float(m.group("w")))
        elif m.group("close") == ")" and stacks["("]:
            scale(stacks["("].pop(), _UP)
        elif m.group("close") == "]" and stacks["["]:
            scale(stacks["["].pop(), _DOWN)
        else:
            for i, part in enumerate(_BREAK.split(m.group(0))):
                if i:
                    runs.append(["BREAK", -1])
                runs.append([part, 1.0])
    for start in stacks["("]:
        scale(start, _UP)
    for start in stacks["["]:
        scale(start, _DOWN)
    if not runs:
        return [["", 1.0]]
    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return merged


# --- learned conditioning -------------------------------------------------------------------------
def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    """One schedule (a single entry ending at `steps`) per prompt; equal prompts share one encoding."""
    cache: dict[str, list] = {}
    res = []
    for prompt in prompts:
        if prompt not in cache:
            texts = SdConditioning([prompt], copy_from=prompts)
            conds = model.get_learned_conditioning(texts)
            cache[prompt] = [ScheduledPromptConditioning(steps, conds[0])]
        res.append(cache[prompt])
    return res


_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch


def get_multicond_prompt_list(prompts):
    res_indexes = []
    index_of: dict[str, int] = {}
    flat = SdConditioning(prompts)
    flat.clear()
    for prompt in prompts:
        indexes = []
        for sub in _AND.split(prompt):
            m = _WEIGHT.search(sub)
            text, weight = (m.group(1), m.group(2)) if m else (sub, None)
            if text not in index_of:
                index_of[text] = len(flat)
                flat.append(text)
            indexes.append((index_of[text], float(weight) if weight is not None else 1.0))
        res_indexes.append(indexes)
    return res_indexes, flat, index_of


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res_indexes, flat, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, flat, steps, hires_steps, use_old_scheduling)
    batch = [[ComposableScheduledPromptConditioning(learned[i], w) for i, w in indexes] for indexes in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def _pick(schedules, current_step):
    for entry in schedules:
        if current_step <= entry.end_at_step:
            return entry.cond
    return schedules[0].cond


def reconstruct_cond_batch(c, current_step):
    """Stack one cond per image; as in the host, conds of different lengths cannot be stacked."""
    param = c[0][0].cond
    res = torch.zeros((len(c),) + tuple(param.shape), device=param.device, dtype=param.dtype)
    for i, schedules in enumerate(c):
        res[i] = _pick(schedules, current_step)
    return res


def stack_conds(tensors):
    """Pad shorter conds by repeating their last vector, then stack (AND sub-prompts)."""
    length = max(t.shape[0] for t in tensors)
    padded = [t if t.shape[0] == length else torch.vstack([t, t[-1:].repeat(length - t.shape[0], 1)])
              for t in tensors]
    return torch.stack(padded)


def reconstruct_multicond_batch(c, current_step):
    param = c.batch[0][0].schedules[0].cond
    tensors, conds_list = [], []
    for composable_prompts in c.batch:
        entry = []
        for cp in composable_prompts:
            entry.append((len(tensors), cp.weight))
            tensors.append(_pick(cp.schedules, current_step))
        conds_list.append(entry)
    return conds_list, stack_conds(tensors).to(device=param.device, dtype=param.dtype)
