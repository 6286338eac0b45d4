"""Prompt parsing of the host (modules/prompt_parser.py): emphasis, BREAK, AND, cond batches, and
prompt editing / alternation (`[a:b:5]`, `[a:0.5]`, `[a::5]`, `[a|b]`) scheduled per sampling step.

The schedule is parsed with the host's own lark grammar (lark 1.1.2, as the host pins it), so
ambiguous or unbalanced brackets resolve exactly as they do there; the step arithmetic (integer =
step, number with a `.` = fraction, hires offsets, `use_old_scheduling`) follows v1.10.1.
"""

from __future__ import annotations

import re
from collections import namedtuple

import lark
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


# --- prompt editing and alternation ----------------------------------------------------------------
# The host's grammar, verbatim: it is the specification of which text is an edit, an alternation or
# plain text (a prompt lark cannot parse is used as written for every step).
_SCHEDULE_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""
_schedule_parser = lark.Lark(_SCHEDULE_GRAMMAR)


def _switch_step(number: str, steps: int, use_old_scheduling: bool, int_offset: int, flt_offset: float) -> int:
    """The step after which an edit `[a:b:number]` shows `b`, capped at `steps`.

    New timelines: a number written with a `.` is a fraction of the steps (in the hires pass, of the
    range 1..2), otherwise an absolute step (in the hires pass, counted from the end of the first
    pass). Old timelines: below 1 a fraction, else a step, with no hires offsets."""
    value = float(number)
    if use_old_scheduling:
        value = value * steps if value < 1 else value
    elif "." in number:
        value = (value - flt_offset) * steps
    else:
        value = value - int_offset
    return min(steps, int(value))


def _schedule_of(prompt: str, steps: int, use_old_scheduling: bool, int_offset: int, flt_offset: float) -> list:
    try:
        tree = _schedule_parser.parse(prompt)
    except lark.exceptions.LarkError:
        return [[steps, prompt]]

    switch_at: dict[int, int] = {}
    boundaries = {steps}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            when = _switch_step(node.children[-2], steps, use_old_scheduling, int_offset, flt_offset)
            switch_at[id(node)] = when
            if when >= 1:
                boundaries.add(when)
        elif node.data == "alternate":
            boundaries.update(range(1, steps + 1))

    def text_at(node, step: int) -> str:
        if node is None:
            return ""
        if isinstance(node, lark.Token):
            return str(node)
        if node.data == "plain":
            return node.children[0].value
        if node.data == "scheduled":
            before, after = node.children[0], node.children[1]
            return text_at(before if step <= switch_at[id(node)] else after, step)
        if node.data == "alternate":
            return text_at(node.children[(step - 1) % len(node.children)], step)
        return "".join(text_at(child, step) for child in node.children)

    return [[step, text_at(tree, step)] for step in sorted(boundaries)]


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    """Per prompt, `[[end_at_step, text], ...]`: the text used up to and including each end step."""
    if hires_steps is None or use_old_scheduling:
        steps, int_offset, flt_offset = base_steps, 0, 0.0
    else:
        steps, int_offset, flt_offset = hires_steps, base_steps, 1.0
    schedules = {prompt: _schedule_of(prompt, steps, use_old_scheduling, int_offset, flt_offset)
                 for prompt in set(prompts)}
    return [schedules[prompt] for prompt in prompts]


# --- learned conditioning -------------------------------------------------------------------------
def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    """Per prompt, its schedule as ScheduledPromptConditioning entries; the texts of one prompt's
    schedule are encoded together in one batch (so they share one token length); equal prompts share
    one encoding."""
    schedules = get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling)
    cache: dict[str, list] = {}
    res = []
    for prompt, schedule in zip(prompts, schedules):
        if prompt not in cache:
            texts = SdConditioning([text for _, text in schedule], copy_from=prompts)
            conds = model.get_learned_conditioning(texts)
            cache[prompt] = [ScheduledPromptConditioning(end, {k: v[i] for k, v in conds.items()} if isinstance(conds, dict)
                                                         else conds[i]) for i, (end, _) in enumerate(schedule)]
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


class DictWithShape(dict):
    """SDXL conds: a dict ("crossattn", "vector") whose `shape` is its crossattn's, so the CFG
    denoiser's `.shape[1]` comparisons work on it. The `shape` argument is ignored (as in the host)."""

    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


def reconstruct_cond_batch(c, current_step):
    """Stack one cond per image (each key of a dict cond on its own); as in the host, conds of
    different lengths cannot be stacked."""
    param = c[0][0].cond
    if isinstance(param, dict):
        res = DictWithShape({k: torch.zeros((len(c),) + tuple(v.shape), device=v.device, dtype=v.dtype)
                             for k, v in param.items()}, (len(c),) + tuple(param["crossattn"].shape))
        for i, schedules in enumerate(c):
            for k, v in _pick(schedules, current_step).items():
                res[k][i] = v
        return res
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
    """Cond rows (one per AND sub-prompt); dict conds stacked key by key into a DictWithShape
    (left on their own device and dtype, as the host leaves them)."""
    param = c.batch[0][0].schedules[0].cond
    tensors, conds_list = [], []
    for composable_prompts in c.batch:
        entry = []
        for cp in composable_prompts:
            entry.append((len(tensors), cp.weight))
            tensors.append(_pick(cp.schedules, current_step))
        conds_list.append(entry)
    if isinstance(tensors[0], dict):
        stacked = {k: stack_conds([x[k] for x in tensors]) for k in tensors[0]}
        return conds_list, DictWithShape(stacked, stacked["crossattn"].shape)
    return conds_list, stack_conds(tensors).to(device=param.device, dtype=param.dtype)
