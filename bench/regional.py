"""Benchmark: regional cross-attention (lib_mos.regional.attention.RegionalContext) in a full-size SD1.5 UNet
(or SDXL's, `--family sdxl`) with random weights on this CPU, against the unhooked UNet and a
per-region-loop reference.

    .venv/bin/python bench/regional.py --size 256 --steps 2
    .venv/bin/python bench/regional.py --size 512 --regions 0 4 8
    .venv/bin/python bench/regional.py --family sdxl --loras --size 256 --steps 2 --regions 4

With `--family sdxl` the UNet is SDXL base's (2.6 B parameters, 70 attn2 layers at two levels,
context 2048, every call also gets a random pooled/size vector `y`); contexts are 2048 wide; the
LoRA sets name SDXL's attention blocks (attn1 + attn2: 560 linears; with ff and proj: 722
modules). Its fp32 weights take about 10.3 GB.

One step is one CFG step of one image: 2 UNet rows (row 0 cond, row 1 uncond) through one UNet
call, at timestep 500. Per region count K:

- ours: `RegionalContext` installed with `attn2_processor`; before every call `set_rows` gets the
  region contexts [2, K, 77, 768] (row 0: each region's random prompt, row 1: its random negative)
  and the per-layer masks of `regions.layer_masks` (boxes on a grid over the image inset by 1/8,
  each grown by 1/16 on every side, so neighbours overlap and the border stays global-only; K=1 is
  one box of 7/8 x 7/8). set_rows is inside the timed call, as in sampling.
- plain: the same UNet and inputs (x, t, global context) without processors: the class attention
  of ldm (einsum + softmax). Note that ours routes every attn2 layer through
  scaled_dot_product_attention, so K=0 can be faster than plain.
- loop: a reference processor written below after the authors' naive code: the global attention,
  then for each region to_q on the cells its mask touches, einsum scores, softmax, einsum, to_out,
  blended by the same weights (kept outside regions, replaced inside, averaged on overlaps).

Each (K, method) runs in a fresh subprocess (`--worker`), so peak RSS values do not mix. A worker
builds the UNet, makes one warm-up call of its method and reads its peak RSS (every timed call
repeats that call exactly), then warms plain up and times the two alternately, --steps rounds,
medians reported: the cores are shared with other processes, and alternating puts their load on
both sides of a ratio alike. So plain_step_s is timed beside ours and loop_plain_step_s beside
loop (ratio_loop_vs_plain uses the latter). The loop worker also runs ours once and reports how
far the two UNet outputs differ; one plain-only worker gives plain_peak_rss_mb. peak_rss_mb is
the process peak (ru_maxrss, weights included); *_over_model_mb subtracts the peak reached before
the first UNet call (weights and inputs). The design target is 4 regions at most 1.10x the plain
step time: this script prints the ratio and never asserts on timings.
Prints one JSON line per region count on stdout, progress on stderr.

--loras: region LoRAs (lib_mos.regional.loras.RegionDeltas) against Regional Prompter's latent mode.

    .venv/bin/python bench/regional.py --loras --size 256 --steps 2 --regions 4
    .venv/bin/python bench/regional.py --loras --size 256 --steps 2 --regions 1 2 4 8

Region counts K (default 1 2 4 8; the same boxes as above) times two LoRA sets (`--lora-sets`):
"attention" (the 128 attention linears, `sd1.unet_attention_linear_names`) and "attention+ff+proj"
(those plus ff.net.0.proj, ff.net.2, proj_in and proj_out of all 16 transformers: 192 modules;
proj_in / proj_out are 1x1 convs, so their LoRA is a `ModuleDelta` with [r, in, 1, 1] factors).
Each region gets its own random rank-4 LoRA at weight 1 (`synthetic.random_lora_concept`, kind
"lora", seeded per region: down N(0, 1/in), up N(0, 0.1^2/rank), so each change has 0.1x the spread
of the random weight it adds to). One fresh worker per (K, set) builds the UNet, the LoRAs and
every hook set once (as per generation), then times these methods alternately, --steps rounds,
medians:

- plain: the UNet without hooks or processors, one call with the 2 rows (as above).
- ours: `RegionalContext` (region contexts and masks as above, context_delta =
  RegionDeltas.context_delta for the attn2 to_k / to_v changes) with the masked `RegionDeltas` of
  all K LoRAs installed: one UNet call; set_rows and set_masks inside the timed call.
- full pass: Regional Prompter's latent mode, K+1 UNet calls of the same 2 rows: one without LoRAs
  over the global context, then one per region over that region's prompt / negative with only
  its LoRA installed everywhere (`RegionDeltas(unet, [lora], 1, masked=False)`); the outputs are
  blended in latent space by `regions.region_masks` at the latent resolution with
  `attention.region_blend_weights` (global kept outside the regions, regions averaged where they
  overlap; the weights are prepared once, the blend itself is timed). Its K RegionDeltas have
  their factors cast before the first call (as the host's LoRAs are loaded before sampling; cast
  lazily, their lasting small tensors fragment the heap and its peak RSS grows with K).
- passes: the product's `"passes": true` (`regional.passes`), a regional UNet call per region with
  LoRAs (plus one for the rest where the regions leave some), each with its region's LoRAs at the
  default `pass_unet_weight`, blended by region: `passes_step_s`, `passes_ratio_vs_plain`.
- regional: ours without the LoRAs (RegionalContext alone), timed beside them so that
  regional_step_s / ratio_regional_vs_plain show what the LoRA hooks add to ours.

Peak RSS per method: the worker resets the process peak (/proc/self/clear_refs, where allowed;
`peak_rss_reset` says whether it was) before each method's warm-up and reads ru_maxrss after it,
in the order plain, regional, ours, full pass (memory the allocator kept from an earlier call
counts again); *_over_model_mb subtracts the peak before the first call, as above.
Cross-checks: `max_rel_diff_vs_full_pass` (max |ours - full| / max |full|) cannot be 0 (attention
blending is not latent blending); `max_rel_diff_plain_vs_full_pass` gives its scale.
`whole_image_rel_diff` is exact: one region covering the whole image, the first region's LoRA,
our method against the full pass for that region alone (its latent blend weight is 1 everywhere
and the global call's 0, so the full pass is that region's unmasked call); ~1e-6 expected.
`whole_image_lora_effect` is how far that LoRA moves the output, for scale. One JSON line per
(K, set) on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.unet_step import materialize
from lib_mos.concepts.synthetic import random_lora_concept
from lib_mos.models import sd1, sdxl
from lib_mos.models.attention import attn2_processor
from lib_mos.models.family import FAMILIES, ModelFamily, family_named
from lib_mos.models.sampling import any_multiple_of_8
from lib_mos.regional.attention import RegionalContext, region_blend_weights
from lib_mos.regional.loras import RegionDeltas, RegionLora
from lib_mos.regional.passes import region_passes
from lib_mos.regional.regions import (
    PASS_UNET_WEIGHT,
    Region,
    RegionSpec,
    attention_sizes,
    layer_masks,
    level_masks,
    region_masks,
)

ROWS = 2  # one image: cond + uncond
TOKENS = 77
TIMESTEP = 500
MARGIN, OVERLAP = 1 / 8, 1 / 16  # fractions of the image
LORA_SETS = ("attention", "attention+ff+proj")
MODEL_NAMES = {"sd1": "sd15-random", "sdxl": "sdxl-random"}
LORA_RANK, LORA_STRENGTH = 4, 0.1  # each change has LORA_STRENGTH x the spread of its weight


def region_boxes(k: int) -> list[tuple[float, float, float, float]]:
    """K boxes [top, left, bottom, right] (fractions) on a ceil(sqrt K)-column grid inside the
    MARGIN inset, each grown by OVERLAP; a grid with more cells than K leaves the last ones empty."""
    if k == 0:
        return []
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    span = 1 - 2 * MARGIN
    boxes = []
    for i in range(k):
        r, c = divmod(i, cols)
        top = MARGIN + span * r / rows - OVERLAP
        bottom = MARGIN + span * (r + 1) / rows + OVERLAP
        left = MARGIN + span * c / cols - OVERLAP
        right = MARGIN + span * (c + 1) / cols + OVERLAP
        boxes.append(tuple(round(min(max(v, 0.0), 1.0), 6) for v in (top, left, bottom, right)))
    return boxes


def box_spec(k: int) -> RegionSpec:
    """The K `region_boxes` as a spec (random contexts stand in for the prompts)."""
    return RegionSpec(regions=tuple(
        Region(prompt=f"region {i}", negative=f"negative {i}", box=box, units="fraction")
        for i, box in enumerate(region_boxes(k))
    ))


def lora_set_names(which: str, family: ModelFamily = sd1.SD1Model.family) -> list[str]:
    """ldm names of the UNet modules a LoRA set changes (see LORA_SETS), block by block."""
    if which not in LORA_SETS:
        raise ValueError(f"LoRA set must be one of {', '.join(LORA_SETS)}, got {which!r}")
    names: list[str] = []
    transformers: list[str] = []
    for attn2 in family.attn2:
        block = attn2.removesuffix(".attn2")  # <transformer>.transformer_blocks.<i>
        names += [f"{block}.{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")]
        if which == "attention+ff+proj":
            names += [f"{block}.ff.net.0.proj", f"{block}.ff.net.2"]
            transformer = block.rsplit(".transformer_blocks.", 1)[0]
            if transformer not in transformers:
                transformers.append(transformer)
    names += [f"{transformer}.{proj}" for transformer in transformers for proj in ("proj_in", "proj_out")]
    return names


def skeleton(family: ModelFamily) -> sd1.SD1Model | sdxl.SDXLModel:
    """The family's full-size model on the meta device."""
    return sd1.build_sd15_skeleton() if family is sd1.SD1Model.family else sdxl.build_sdxl_skeleton()


def with_vector(unet: nn.Module, family: ModelFamily, rows: int, gen: torch.Generator) -> Callable[..., torch.Tensor]:
    """unet(x, t, context=...) with SDXL's pooled/size vector `y` fixed (random) for every call."""
    if family.vector_dim is None:
        return unet
    y = torch.randn(rows, family.vector_dim, generator=gen)
    return lambda x, t, context: unet(x, t, context=context, y=y)


# ------------------------------------------------------------------------------ loop reference
def naive_attention(module: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The authors' path for one prompt: to_q/to_k/to_v, einsum scores, softmax, einsum, to_out."""
    h = module.heads
    q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
    b, n, inner = q.shape
    d = inner // h
    q = q.reshape(b, n, h, d)
    k = k.reshape(b, -1, h, d)
    v = v.reshape(b, -1, h, d)
    sim = torch.einsum("bnhd,bthd->bhnt", q, k) * d**-0.5
    out = torch.einsum("bhnt,bthd->bnhd", sim.softmax(dim=-1), v)
    return module.to_out(out.reshape(b, n, inner))


class LoopRegional:
    """attn2 processor: global attention, then one naive attention per region on its cells, blended.

    Same row plan as RegionalContext: region_context [B, K, T, D], weights per layer [K, N] or
    [B, K, N]. Blend: w_global = 1 - min(coverage, 1), w_k = m_k / max(coverage, 1).
    """

    def __init__(self) -> None:
        self.region_context: torch.Tensor | None = None
        self.weights: Sequence[torch.Tensor] = ()

    def set_rows(self, region_context: torch.Tensor, weights: Sequence[torch.Tensor]) -> None:
        self.region_context, self.weights = region_context, weights

    def __call__(self, module: nn.Module, layer: int, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if self.region_context is None:
            raise RuntimeError("LoopRegional: call set_rows() before the UNet")
        if context is None:
            context = x
        out = naive_attention(module, x, context)
        regions = self.region_context.shape[1]
        if regions == 0:
            return out
        m = self.weights[layer]
        if m.dim() == 2:
            m = m.unsqueeze(0).expand(x.shape[0], -1, -1)
        coverage = m.sum(1)  # [B, N]
        out = out * (1 - coverage.clamp(max=1.0)).unsqueeze(-1)
        share = m / coverage.clamp(min=1.0).unsqueeze(1)  # [B, K, N]
        for r in range(regions):
            cells = m[:, r].any(0).nonzero().squeeze(1)  # the region's box at this layer's size
            if cells.numel() == 0:
                continue  # the box vanished at this resolution
            o = naive_attention(module, x[:, cells], self.region_context[:, r])
            out.index_add_(1, cells, o * share[:, r, cells].unsqueeze(-1))
        return out


# ----------------------------------------------------------------------------------------- worker
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _interleaved(calls: dict[str, Callable[[], torch.Tensor]], steps: int) -> dict[str, list[float]]:
    """`steps` rounds of one timed call of each, alternating, so that load from other processes on
    the shared cores hits every method alike (the callers did their warm-ups)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(steps):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return times


def _worker(args: argparse.Namespace) -> dict:
    k, size, family = args.regions[0], args.size, family_named(args.family)
    module = materialize(skeleton(family).unet, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(ROWS, 4, size // 8, size // 8, generator=gen)
    t = torch.full((ROWS,), TIMESTEP)
    width = family.context_dim
    context = torch.randn(ROWS, TOKENS, width, generator=gen)  # row 0 prompt, row 1 negative
    region_context = torch.randn(ROWS, k, TOKENS, width, generator=gen)  # row 0 prompts, row 1 negatives
    unet = with_vector(module, family, ROWS, gen)
    spec = box_spec(k)
    # layer_masks needs at least one region (avg_pool2d rejects a 0-channel input): K=0 plans empty masks
    weights = (layer_masks(spec, size, size, family=family) if k
               else [torch.zeros(0, h * w) for h, w in attention_sizes(size, size, family)])
    coverage = region_masks(spec, size, size).flatten(1).sum(0) if k else torch.zeros(1)
    model_rss = _peak_rss_mb()

    def plain() -> torch.Tensor:
        return unet(x, t, context=context)

    ours_proc = RegionalContext()

    def ours() -> torch.Tensor:
        with attn2_processor(module, ours_proc):
            ours_proc.set_rows(region_context, weights)
            return unet(x, t, context=context)

    loop_proc = LoopRegional()

    def loop() -> torch.Tensor:
        with attn2_processor(module, loop_proc):
            loop_proc.set_rows(region_context, weights)
            return unet(x, t, context=context)

    result: dict = {"worker": args.worker, "regions": k, "size": size, "threads": torch.get_num_threads(),
                    "family": family.name,
                    "latent_covered": float((coverage > 0).float().mean()),
                    "latent_overlapped": float((coverage > 1).float().mean())}
    with torch.inference_mode(), any_multiple_of_8():
        main_call = {"plain": plain, "ours": ours, "loop": loop}[args.worker]
        out = main_call()  # warm-up; it also sets the method's peak RSS (every timed call is the same)
        peak = _peak_rss_mb()
        result.update(peak_rss_mb=round(peak), peak_rss_over_model_mb=round(peak - model_rss))
        calls = {"step_s": main_call}
        if args.worker != "plain":
            plain()  # warm-up
            calls["plain_step_s"] = plain
        for name, times in _interleaved(calls, args.steps).items():
            result.update({name: statistics.median(times), f"{name}_all": times})
        if args.worker == "loop":
            result["max_rel_diff_ours_vs_loop"] = float((ours() - out).abs().max() / out.abs().max())
    return result


# ------------------------------------------------------------------------------ --loras worker
def _reset_peak_rss() -> bool:
    """Reset the process peak RSS to the current RSS (Linux clear_refs 5); False where not allowed."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _lora_worker(args: argparse.Namespace) -> dict:
    k, size, which, family = args.regions[0], args.size, args.lora_set, family_named(args.family)
    model = skeleton(family)
    module = materialize(model.unet, seed=args.seed)  # in place: model.unet is this module now
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same inputs as the default mode
    x = torch.randn(ROWS, 4, size // 8, size // 8, generator=gen)
    t = torch.full((ROWS,), TIMESTEP)
    width = family.context_dim
    context = torch.randn(ROWS, TOKENS, width, generator=gen)  # row 0 prompt, row 1 negative
    region_context = torch.randn(ROWS, k, TOKENS, width, generator=gen)  # row 0 prompts, row 1 negatives
    unet = with_vector(module, family, ROWS, gen)
    spec = box_spec(k)
    weights = layer_masks(spec, size, size, family=family)
    levels = level_masks(spec, size, size, family=family)
    coverage = levels[(size // 8, size // 8)].sum(0)
    # full pass: latent blend weights, prepared once ([1, 1, h, w] and [K, 1, 1, h, w])
    latent = region_masks(spec, size, size)
    w_global, w_regions = region_blend_weights(latent.reshape(1, k, -1))
    w_global = w_global.reshape(1, 1, *latent.shape[1:])
    w_regions = w_regions[0].reshape(k, 1, 1, *latent.shape[1:])

    names = lora_set_names(which, family)
    concepts = [random_lora_concept(model, "lora", triggers=(f"region {r}",), seed=args.seed + 100 + r,
                                    rank=LORA_RANK, strength=LORA_STRENGTH, name=f"region-{r}",
                                    unet_names=names, text_names=[]) for r in range(k)]
    loras = [RegionLora(r, c, 1.0, c.name) for r, c in enumerate(concepts)]
    deltas = RegionDeltas(module, loras, k)
    singles = [RegionDeltas(module, [RegionLora(0, c, 1.0, c.name)], 1, masked=False) for c in concepts]
    # Regional Prompter has its LoRAs ready before sampling: cast the singles' factors now. Left to
    # their first UNet call (RegionDeltas casts lazily in the hooks), each instance's small lasting
    # tensors land amid the activations and the heap grows ~120 MB per instance at 256 px.
    for single in singles:
        for plan in single.plans.values():
            plan.tensors(x.dtype, x.device)
    proc = RegionalContext()
    proc.context_delta = deltas.context_delta
    model_rss = _peak_rss_mb()

    def plain() -> torch.Tensor:
        return unet(x, t, context=context)

    regional_proc = RegionalContext()

    def regional() -> torch.Tensor:  # ours without the LoRAs: what the LoRA hooks add on top
        with attn2_processor(module, regional_proc):
            regional_proc.set_rows(region_context, weights)
            return unet(x, t, context=context)

    def ours() -> torch.Tensor:
        with attn2_processor(module, proc), deltas.installed():
            proc.set_rows(region_context, weights)
            deltas.set_masks(levels)
            return unet(x, t, context=context)

    def full_pass() -> torch.Tensor:
        out = unet(x, t, context=context) * w_global
        for r, single in enumerate(singles):
            with single.installed():
                out += unet(x, t, context=region_context[:, r]) * w_regions[r]
        return out

    runs = region_passes(module, loras, levels, weights, latent, unet_weight=PASS_UNET_WEIGHT)

    def passes() -> torch.Tensor:  # the product's `passes`: a regional UNet call per region with LoRAs
        out = torch.zeros_like(x)
        for run in runs:
            with attn2_processor(module, run.processor), (run.deltas.installed() if run.deltas
                                                          else contextlib.nullcontext()):
                run.set_rows(region_context)
                out += unet(x, t, context=context) * run.share
        return out

    result: dict = {"worker": "loras", "family": family.name, "regions": k, "loras": which, "lora_modules": len(names),
                    "lora_rank": LORA_RANK, "size": size, "threads": torch.get_num_threads(),
                    "latent_covered": float((coverage > 0).float().mean()),
                    "latent_overlapped": float((coverage > 1).float().mean())}
    outs, reset = {}, True
    with torch.inference_mode(), any_multiple_of_8():
        # warm-ups, each setting its method's peak RSS (every timed call repeats it)
        for key, call in (("plain_", plain), ("regional_", regional), ("", ours), ("full_pass_", full_pass),
                          ("passes_", passes)):
            reset = _reset_peak_rss() and reset
            print(f"# K={k} {which}: warm-up {key or 'ours_'}", file=sys.stderr, flush=True)
            outs[key] = call()
            peak = _peak_rss_mb()
            result.update({f"{key}peak_rss_mb": round(peak), f"{key}peak_rss_over_model_mb": round(peak - model_rss)})
        result["peak_rss_reset"] = reset
        result["max_rel_diff_vs_full_pass"] = _rel_diff(outs[""], outs["full_pass_"])
        result["max_rel_diff_plain_vs_full_pass"] = _rel_diff(outs["plain_"], outs["full_pass_"])
        del outs
        print(f"# K={k} {which}: timing", file=sys.stderr, flush=True)
        calls = {"plain_step_s": plain, "regional_step_s": regional, "step_s": ours, "full_pass_step_s": full_pass,
                 "passes_step_s": passes}
        for name, times in _interleaved(calls, args.steps).items():
            result.update({name: statistics.median(times), f"{name}_all": times})

        # exact cross-check: one region over the whole image with the first region's LoRA
        print(f"# K={k} {which}: whole-image check", file=sys.stderr, flush=True)
        whole = RegionSpec(regions=(Region(prompt="whole", negative="whole", box=(0.0, 0.0, 1.0, 1.0), units="fraction"),))
        whole_weights = layer_masks(whole, size, size, family=family)
        whole_deltas = RegionDeltas(module, [RegionLora(0, concepts[0], 1.0, concepts[0].name)], 1)
        whole_proc = RegionalContext()
        whole_proc.context_delta = whole_deltas.context_delta
        with attn2_processor(module, whole_proc), whole_deltas.installed():
            whole_proc.set_rows(region_context[:, :1], whole_weights)
            whole_deltas.set_masks(level_masks(whole, size, size, family=family))
            ours_whole = unet(x, t, context=context)
        with singles[0].installed():  # latent blend weight 1 everywhere, global's 0: the region's call
            full_whole = unet(x, t, context=region_context[:, 0])
        result["whole_image_rel_diff"] = _rel_diff(ours_whole, full_whole)
        result["whole_image_lora_effect"] = _rel_diff(unet(x, t, context=region_context[:, 0]), full_whole)
    return result


def _run_worker(args: argparse.Namespace, method: str, k: int, lora_set: str | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--regions", str(k),
           "--size", str(args.size), "--steps", str(args.steps), "--seed", str(args.seed), "--family", args.family]
    if lora_set is not None:
        cmd += ["--lora-set", lora_set]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"worker failed: {' '.join(cmd)}")
    label = method if lora_set is None else f"{method} {lora_set}"
    print(f"# {label} K={k}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _round(value: object) -> object:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="image side in pixels, a multiple of 8")
    ap.add_argument("--steps", type=int, default=3, help="timed repeats per configuration (median reported)")
    ap.add_argument("--regions", type=int, nargs="+", default=None,
                    help="region counts (default 0 1 2 4 8; with --loras 1 2 4 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", choices=list(FAMILIES), default="sd1", help="the UNet: SD1.5's or SDXL base's shapes")
    ap.add_argument("--loras", action="store_true",
                    help="region LoRAs: ours (one pass) against Regional Prompter's latent mode (K+1 passes)")
    ap.add_argument("--lora-sets", nargs="+", choices=LORA_SETS, default=list(LORA_SETS),
                    help="with --loras: the modules each region's LoRA changes")
    ap.add_argument("--worker", choices=["plain", "ours", "loop", "loras"], help=argparse.SUPPRESS)
    ap.add_argument("--lora-set", choices=LORA_SETS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.regions is None:
        args.regions = [1, 2, 4, 8] if args.loras else [0, 1, 2, 4, 8]
    if args.size <= 0 or args.size % 8:
        ap.error("--size must be a positive multiple of 8")
    if args.steps < 1 or any(k < 0 for k in args.regions):
        ap.error("--steps must be >= 1 and --regions >= 0")
    if (args.loras or args.worker == "loras") and any(k < 1 for k in args.regions):
        ap.error("--loras needs --regions >= 1 (each region has a LoRA)")

    if args.worker == "loras":
        print(json.dumps(_lora_worker(args)))
        return
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    if args.loras:
        _main_loras(args)
        return

    t_start = time.perf_counter()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, size {args.size}, "
          f"{args.steps} timed steps per configuration", file=sys.stderr, flush=True)
    plain = _run_worker(args, "plain", 0)
    ratios = {}
    for k in args.regions:
        ours = _run_worker(args, "ours", k)
        loop = _run_worker(args, "loop", k)
        ratios[k] = ours["step_s"] / ours["plain_step_s"]
        row = {
            "bench": "regional", "model": MODEL_NAMES[args.family], "regions": k, "size": args.size, "unet_rows": ROWS,
            "steps": args.steps, "threads": ours["threads"],
            "step_s": ours["step_s"], "plain_step_s": ours["plain_step_s"], "loop_step_s": loop["step_s"],
            "loop_plain_step_s": loop["plain_step_s"],
            "ratio_vs_plain": ratios[k], "ratio_loop_vs_plain": loop["step_s"] / loop["plain_step_s"],
            "ratio_loop_vs_ours": loop["step_s"] / ours["step_s"],
            "peak_rss_mb": ours["peak_rss_mb"], "peak_rss_over_model_mb": ours["peak_rss_over_model_mb"],
            "loop_peak_rss_mb": loop["peak_rss_mb"], "loop_peak_rss_over_model_mb": loop["peak_rss_over_model_mb"],
            "plain_peak_rss_mb": plain["peak_rss_mb"], "plain_peak_rss_over_model_mb": plain["peak_rss_over_model_mb"],
            "plain_alone_step_s": plain["step_s"],
            "max_rel_diff_ours_vs_loop": loop["max_rel_diff_ours_vs_loop"],
            "latent_covered": ours["latent_covered"], "latent_overlapped": ours["latent_overlapped"],
            "step_s_all": ours["step_s_all"], "plain_step_s_all": ours["plain_step_s_all"],
            "loop_step_s_all": loop["step_s_all"], "loop_plain_step_s_all": loop["plain_step_s_all"],
        }
        print(json.dumps({key: _round(v) for key, v in row.items()}), flush=True)
    if 4 in ratios:
        print(f"# 4 regions: {ratios[4]:.3f}x the plain step (design target: at most 1.10x)", file=sys.stderr)
    print(f"# total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)


def _main_loras(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    print(f"# --loras: torch {torch.__version__}, {torch.get_num_threads()} threads, size {args.size}, "
          f"{args.steps} timed steps per configuration, rank {LORA_RANK}", file=sys.stderr, flush=True)
    for k in args.regions:
        for which in args.lora_sets:
            r = _run_worker(args, "loras", k, lora_set=which)
            row = {
                "bench": "regional_loras", "model": MODEL_NAMES[args.family], "regions": k, "loras": which,
                "lora_modules": r["lora_modules"], "lora_rank": r["lora_rank"], "size": args.size,
                "unet_rows": ROWS, "steps": args.steps, "threads": r["threads"],
                "step_s": r["step_s"], "plain_step_s": r["plain_step_s"], "full_pass_step_s": r["full_pass_step_s"],
                "regional_step_s": r["regional_step_s"],
                "ratio_vs_plain": r["step_s"] / r["plain_step_s"],
                "ratio_regional_vs_plain": r["regional_step_s"] / r["plain_step_s"],
                "full_pass_ratio_vs_plain": r["full_pass_step_s"] / r["plain_step_s"],
                "full_pass_ratio_vs_ours": r["full_pass_step_s"] / r["step_s"],
                "passes_step_s": r["passes_step_s"], "passes_ratio_vs_plain": r["passes_step_s"] / r["plain_step_s"],
                "passes_peak_rss_over_model_mb": r["passes_peak_rss_over_model_mb"],
                "peak_rss_mb": r["peak_rss_mb"], "peak_rss_over_model_mb": r["peak_rss_over_model_mb"],
                "full_pass_peak_rss_mb": r["full_pass_peak_rss_mb"],
                "full_pass_peak_rss_over_model_mb": r["full_pass_peak_rss_over_model_mb"],
                "plain_peak_rss_mb": r["plain_peak_rss_mb"], "plain_peak_rss_over_model_mb": r["plain_peak_rss_over_model_mb"],
                "regional_peak_rss_over_model_mb": r["regional_peak_rss_over_model_mb"],
                "peak_rss_reset": r["peak_rss_reset"],
                "max_rel_diff_vs_full_pass": r["max_rel_diff_vs_full_pass"],
                "max_rel_diff_plain_vs_full_pass": r["max_rel_diff_plain_vs_full_pass"],
                "whole_image_rel_diff": r["whole_image_rel_diff"], "whole_image_lora_effect": r["whole_image_lora_effect"],
                "latent_covered": r["latent_covered"], "latent_overlapped": r["latent_overlapped"],
                "step_s_all": r["step_s_all"], "plain_step_s_all": r["plain_step_s_all"],
                "full_pass_step_s_all": r["full_pass_step_s_all"], "regional_step_s_all": r["regional_step_s_all"],
                "passes_step_s_all": r["passes_step_s_all"],
            }
            print(json.dumps({key: _round(v) for key, v in row.items()}), flush=True)
            print(f"# K={k} {which}: ours {row['ratio_vs_plain']:.3f}x plain (without LoRAs "
                  f"{row['ratio_regional_vs_plain']:.3f}x), full pass "
                  f"{row['full_pass_ratio_vs_plain']:.3f}x plain, separate passes {row['passes_ratio_vs_plain']:.3f}x "
                  f"plain, whole-image diff {r['whole_image_rel_diff']:.2e}",
                  file=sys.stderr, flush=True)
    print(f"# total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
