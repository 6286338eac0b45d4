"""Benchmark: regional cross-attention (lib_mos.attention.RegionalContext) in a full-size SD1.5 UNet
with random weights on this CPU, against the unhooked UNet and a per-region-loop reference.

    .venv/bin/python bench/regional.py --size 256 --steps 2
    .venv/bin/python bench/regional.py --size 512 --regions 0 4 8

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
"""

from __future__ import annotations

import argparse
import json
import math
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
from lib_mos import sd1
from lib_mos.attention import RegionalContext, attn2_processor
from lib_mos.regions import Region, RegionSpec, attention_sizes, layer_masks
from lib_mos.sampling import any_multiple_of_8

ROWS = 2  # one image: cond + uncond
TOKENS, WIDTH = 77, 768
TIMESTEP = 500
MARGIN, OVERLAP = 1 / 8, 1 / 16  # fractions of the image


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
    k, size = args.regions[0], args.size
    unet = materialize(sd1.build_sd15_skeleton().unet, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(ROWS, 4, size // 8, size // 8, generator=gen)
    t = torch.full((ROWS,), TIMESTEP)
    context = torch.randn(ROWS, TOKENS, WIDTH, generator=gen)  # row 0 prompt, row 1 negative
    region_context = torch.randn(ROWS, k, TOKENS, WIDTH, generator=gen)  # row 0 prompts, row 1 negatives
    spec = RegionSpec(regions=tuple(
        Region(prompt=f"region {i}", negative=f"negative {i}", box=box, units="fraction")
        for i, box in enumerate(region_boxes(k))
    ))
    # layer_masks needs at least one region (avg_pool2d rejects a 0-channel input): K=0 plans empty masks
    weights = layer_masks(spec, size, size) if k else [torch.zeros(0, h * w) for h, w in attention_sizes(size, size)]
    latent = weights[0]  # layer 0 runs at the latent resolution
    coverage = latent.sum(0)
    model_rss = _peak_rss_mb()

    def plain() -> torch.Tensor:
        return unet(x, t, context=context)

    ours_proc = RegionalContext()

    def ours() -> torch.Tensor:
        with attn2_processor(unet, ours_proc):
            ours_proc.set_rows(region_context, weights)
            return unet(x, t, context=context)

    loop_proc = LoopRegional()

    def loop() -> torch.Tensor:
        with attn2_processor(unet, loop_proc):
            loop_proc.set_rows(region_context, weights)
            return unet(x, t, context=context)

    result: dict = {"worker": args.worker, "regions": k, "size": size, "threads": torch.get_num_threads(),
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


def _run_worker(args: argparse.Namespace, method: str, k: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--regions", str(k),
           "--size", str(args.size), "--steps", str(args.steps), "--seed", str(args.seed)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"worker failed: {' '.join(cmd)}")
    print(f"# {method} K={k}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
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
    ap.add_argument("--regions", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=["plain", "ours", "loop"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.size <= 0 or args.size % 8:
        ap.error("--size must be a positive multiple of 8")
    if args.steps < 1 or any(k < 0 for k in args.regions):
        ap.error("--steps must be >= 1 and --regions >= 0")

    if args.worker:
        print(json.dumps(_worker(args)))
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
            "bench": "regional", "model": "sd15-random", "regions": k, "size": args.size, "unet_rows": ROWS,
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


if __name__ == "__main__":
    main()
