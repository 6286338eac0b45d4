"""Forge's classifier-free guidance (backend/sampling/sampling_function.py and the forward of
modules/sd_samplers_cfg_denoiser.py), for the host double's SD1 model.

What the extension depends on, as Forge does it:
- the denoiser calls `on_cfg_denoiser` with the B latents and the step's cond and uncond; at CFG
  scale 1 there are no negatives at all (`text_uncond` None), and NGMS / skip-early-CFG set the
  scale to 1, which drops the uncond chunk;
- the conds become a list of entries, one per AND part across the images (`zip(*composition)`),
  then the negatives; entries whose contexts can be concatenated (token counts within a factor
  of 4 of their least common multiple) are batched, in *reverse* order (uncond first), as many as
  memory allows (`MAX_ROWS`, this double's stand-in for Forge's free-memory estimate), the shorter
  contexts tiled to the common length;
- each UNet call gets `transformer_options` with `cond_or_uncond` (0 cond, 1 uncond, per chunk).

Stricter than Forge: SD1 tensor conds only (no SDXL dict), no hires pass, no inpainting mask.
"""

from __future__ import annotations

import math

import torch

COND, UNCOND = 0, 1
MAX_ROWS: int | None = None  # None: everything fits; else the most rows one UNet call may take


def _can_concat(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        return False
    common = math.lcm(a.shape[1], b.shape[1])
    return common // min(a.shape[1], b.shape[1]) <= 4


def _concat(contexts: list[torch.Tensor]) -> torch.Tensor:
    common = math.lcm(*(c.shape[1] for c in contexts))
    return torch.cat([c.repeat(1, common // c.shape[1], 1) for c in contexts])


def calc_cond_uncond_batch(apply_model, cond: list[dict], uncond: list[dict] | None, x_in: torch.Tensor,
                           timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out_cond, out_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    out_uncond, out_uncond_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    to_run = [(c, COND) for c in cond] + [(u, UNCOND) for u in uncond or []]
    while to_run:
        first = to_run[0][0]["cross_attn"]
        candidates = [i for i in range(len(to_run)) if _can_concat(to_run[i][0]["cross_attn"], first)]
        candidates.reverse()
        to_batch = candidates[:1]
        for i in range(1, len(candidates) + 1):
            amount = candidates[:len(candidates) // i]
            if MAX_ROWS is None or len(amount) * x_in.shape[0] <= MAX_ROWS:
                to_batch = amount
                break
        entries = [to_run.pop(i) for i in to_batch]
        kinds = [kind for _, kind in entries]
        context = _concat([entry["cross_attn"] for entry, _ in entries])
        options = {"cond_or_uncond": kinds[:], "sigmas": timestep}
        output = apply_model(torch.cat([x_in] * len(entries)), torch.cat([timestep] * len(entries)), context,
                             options).chunk(len(entries))
        for (entry, kind), out in zip(entries, output):
            mult = entry.get("strength", 1.0)
            if kind == COND:
                out_cond += out * mult
                out_count += mult
            else:
                out_uncond += out * mult
                out_uncond_count += mult
    return out_cond / out_count, out_uncond / out_uncond_count


def compile_conditions(cond: torch.Tensor | None) -> list[dict] | None:
    if cond is None:
        return None
    if not isinstance(cond, torch.Tensor):
        raise NotImplementedError("the Forge double samples SD1 tensor conds only")
    return [{"cross_attn": cond}]


def compile_weighted_conditions(cond: torch.Tensor, composition) -> list[dict]:
    results = []
    for parts in zip(*composition):  # as Forge: the k-th part of every image (zip truncates)
        entry = compile_conditions(cond[[i for i, _ in parts]])[0]
        entry["strength"] = parts[-1][1]
        results.append(entry)
    return results


def sampling_function(apply_model, x, timestep, text_cond, text_uncond, composition, cond_scale):
    """(denoised, cond_pred, uncond_pred) as Forge's `sampling_function` and `_inner`."""
    cond = compile_weighted_conditions(text_cond, composition)
    uncond = compile_conditions(text_uncond)
    edit_strength = sum(entry.get("strength", 1) for entry in cond)
    uncond_ = None if math.isclose(cond_scale, 1.0) else uncond
    cond_pred, uncond_pred = calc_cond_uncond_batch(apply_model, cond, uncond_, x, timestep)
    if not math.isclose(edit_strength, 1.0):
        return uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength, cond_pred, uncond_pred
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale, cond_pred, uncond_pred
