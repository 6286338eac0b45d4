"""Benchmark: our fusion solve (streamed Gram statistics + Cholesky, regularised toward the weight
average) against the authors' LBFGS on full-size SD1.5 layer shapes with random weights and seeded
synthetic concepts, on this CPU, and the cost of the held-out check.

    .venv/bin/python bench/fusion.py --quick
    .venv/bin/python bench/fusion.py --concepts 2 4 8 --lbfgs-layers 2 --spatial-steps 4
    .venv/bin/python bench/fusion.py --process sd15    # in-process fusion against the tab's child process
    .venv/bin/python bench/fusion.py --mixed           # the real fuse() on a mixed concept set
    .venv/bin/python bench/fusion.py --mixed --quick   # the same on the tiny model, a few layers of each kind
    .venv/bin/python bench/fusion.py --family sdxl --seeds 1   # a whole full-size SDXL fusion under --memory-gb 8

Stages as lib_mos.fusion runs them (docs/method.md): "te" = 48 text-encoder linears 768x768,
176 rows per concept per layer, 500 LBFGS iterations; "kv" = 32 attn2 to_k/to_v (in 768, out
320/640/1280), 6 rows per concept per layer (2 prompts x (2 concept tokens + EOS), the layer's own
prompt variant only), 500 iterations; "spatialW" = a sample of the W x W spatial linears of width W
(30/30/36 in SD1.5) with 4096/1024/256 rows per sampling step and seed (`--seeds`, default 4 as
the fusion's spatial_seeds), 50 iterations. Held-out rows (another prompt pair: 304 rows for te, 6
for kv; one more seed for spatial) stream into report-only statistics and are scored after the
solve, as the fusion report does; validation rows (a third prompt pair, one more seed) choose each
layer's ridge.

Every (concept count, stage, method) runs in a fresh subprocess (`--worker`) so peak RSS values do
not mix; the exact side runs twice, with and without the validation and held-out
rows, so their cost is the difference. The exact side streams activations through LayerStats for all layers of the stage at
once, as hooks would; the LBFGS side stores the activations of `--lbfgs-layers` layers like the
authors and its per-layer time is extrapolated to the stage (marked "extrapolated"); on those
layers it also scores every method on held-out rows (ours, the unregularised least squares the
project used before, LBFGS, averaging). Prints one JSON line per configuration on stdout; a
benchmark reports, it never asserts on timings.

`--mixed` runs the real `lib_mos.fusion.fuse` (hooks, sampling, solve, report) on a random-weight
SD1-topology model with a mixed concept set, cycling through four kinds: an ED-LoRA-like concept
(two tokens; LoRA on every UNet and text-encoder attention linear), a kohya LoCon (trigger words;
every text-encoder linear including the MLP, every UNet transformer-block linear including the
feed-forward, proj_in / proj_out, every resnet 3x3 conv at conv_dim 2), a LyCORIS LoHa on the same
layers, and a kohya LoRA without convs (`lib_mos.concepts.synthetic`). The first two already change every
layer the others change, so from 2 concepts on the layer set, and with it the statistics the
solve holds, is the same: what changes with the count is the concept count alone. Each (concept
count, stage) runs in a fresh worker that builds the model and concepts, loads the earlier
stages' fused weights (written by the previous worker, so the stage sees exactly the inputs it
sees inside one fusion) and runs `fuse()` with every other stage skipped: its peak RSS
(ru_maxrss) is that stage's, and `rss_setup_mb` (resident memory after building the model and
concepts, before the stage) tells the stage's own part from the model's. A last JSON line gives
the peak RSS ratio between the largest and the smallest concept count, per stage and for the
whole fusion (the largest stage peak), and whether it is within 10 %.

Model (`--model`, default "mid"): SD1.5's text encoder at full size (768 wide, MLP 3072: the text
stage's real widths, and the real 768-wide context of attn2 k/v) and the SD1 UNet topology at 64
channels (1/5 of SD1.5's 320; heads 8), so the 44 resnet 3x3 convs unfold to 576 ... 4608 inputs.
SD1.5's own UNet widths are out of reach on this machine (2 cores, 24 GB shared), not by a little:
its resnet convs unfold to up to 23,040 inputs (output_blocks 0-4 conv1: 2560 channels x 3 x 3),
8.3 GiB of statistics per layer by `fusion.spatial_passes`' own estimate (more than the 8 GiB
default budget: such a layer gets a pass of its own; 16 sampling passes for the resnet convs alone), a 4.2 GB float64
Gram at solve time, and a Cholesky of 4 TFLOP per ridge candidate (about 100 s each at the
40 GFLOP/s this CPU reaches). At 64 channels the widest solves take seconds and the default run
(2 and 8 concepts, six workers) finishes in 4-6 minutes here. Spatial
sampling: 128 px, 2 steps, 4 seeds (+1 validation, +1 held-out seed).
`--quick`: the tiny model (UNet 32...128 channels, text encoder 32 wide), the concepts on the first
and last transformer block and resnet and the first and last text-encoder layer only, 64 px,
1 step: a few seconds per stage.

Peak RSS under glibc's default allocator depends on allocation history as well as on what is
live: its dynamic mmap threshold rises to the size of the first large buffer freed, after which
such buffers (a layer's float64 change, ~5-19 MB in the text encoder, allocated anew for every
concept) come from the heap and are not all given back. The fuse command fixes the threshold at
4 MiB for itself (lib_mos.__main__._steady_allocator); `--mmap-threshold BYTES` runs the workers
with that (default) or another fixed threshold (MALLOC_MMAP_THRESHOLD_), 0 with glibc's own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_mos.fusion.solver import (
    LayerStats,
    objective,
    relative_errors,
    relative_errors_many,
    solve_exact,
    solve_lbfgs,
    weight_average,
)

HELD_OUT_CHUNK = 10_000  # chunk keys of held-out rows: never those of the rows the solve sees
VALIDATION_CHUNK = 20_000  # and of validation rows, which choose each layer's ridge


@dataclass(frozen=True)
class Stage:
    """One fusion stage: the layer shapes it fuses and how activations arrive."""

    name: str
    shapes: tuple[tuple[int, int], ...]  # (out, in) per layer of the full stage
    chunks: tuple[int, ...]  # rows per streamed chunk, for one concept and one layer
    iterations: int  # the authors' LBFGS iterations for this stage
    shared: tuple[int, ...] = ()  # leading rows of each chunk that every concept sees (nearly) alike
    held_out: tuple[int, ...] = ()  # rows per held-out chunk (the report's check, never solved from)
    held_out_shared: tuple[int, ...] = ()
    validation: tuple[int, ...] = ()  # rows per validation chunk (choose the ridge, never solved from)
    validation_shared: tuple[int, ...] = ()


def _te_stage() -> Stage:
    # 16 layer variants x ("photo of a <a> <b>" = 7 tokens, "<a> <b>" = 4 tokens), one pass per prompt;
    # the causal encoder gives BOS and "photo of a" the same rows in every prompt and concept, up to
    # the small drift that each concept's own LoRAs in earlier layers cause. Held out: "a close-up
    # picture of <a> <b> outdoors" (11 tokens, 7 before the concept) and "<a> <b> next to a window" (8);
    # validation: "a <a> <b> in the garden" (8, 2) and "a painting of <a> <b>" (7, 4)
    return Stage("te", ((768, 768),) * 48, (7, 4) * 16, 500, shared=(4, 1) * 16,
                 held_out=(11, 8) * 16, held_out_shared=(7, 1) * 16,
                 validation=(8, 7) * 16, validation_shared=(2, 4) * 16)


def _kv_stage() -> Stage:
    widths = (320,) * 5 + (640,) * 5 + (1280,) * 6  # attn2 blocks by level, SD1.5
    shapes = tuple((w, 768) for w in widths for _ in ("to_k", "to_v"))
    return Stage("kv", shapes, (3, 3), 500, held_out=(3, 3), validation=(3, 3))


_SPATIAL = {320: (30, 4096), 640: (30, 1024), 1280: (36, 256)}  # width: (layers in SD1.5, rows/step)


def _spatial_stage(width: int, steps: int, seeds: int) -> Stage:
    layers, rows = _SPATIAL[width]
    return Stage(f"spatial{width}", ((width, width),) * layers, (rows * seeds,) * steps, 50,
                 held_out=(rows,) * steps, validation=(rows,) * steps)


def _stage(name: str, steps: int, seeds: int) -> Stage:
    if name == "te":
        return _te_stage()
    if name == "kv":
        return _kv_stage()
    return _spatial_stage(int(name.removeprefix("spatial")), steps, seeds)


# ----------------------------------------------------------------------------- synthetic concepts
def _generator(*key: int) -> torch.Generator:
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + k) % (2**62)
    return torch.Generator().manual_seed(seed)


def _base_weight(seed: int, stage: int, layer: int, shape: tuple[int, int]) -> torch.Tensor:
    out, width = shape
    return torch.randn(out, width, generator=_generator(seed, stage, layer)) / math.sqrt(width)


class _Layer:
    """Seeded synthetic activations of one layer: a shared anisotropic part every concept sees
    (like "photo of a" and the model's common features), a concept-specific subspace, a little
    isotropic noise; each concept's LoRA (rank 4) reads mostly its own subspace."""

    def __init__(self, seed: int, stage: int, layer: int, shape: tuple[int, int]) -> None:
        self.key = (seed, stage, layer)
        self.out, self.width = shape
        gen = _generator(seed, stage, layer, 1)
        common = max(self.width // 4, 8)
        spectrum = torch.arange(1, common + 1, dtype=torch.float32) ** -0.5
        self.common = spectrum[:, None] * torch.randn(common, self.width, generator=gen)

    def concept(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(concept subspace [16, in], dW [out, in]) of concept `index`."""
        gen = _generator(*self.key, 2, index)
        own = torch.randn(16, self.width, generator=gen) * 2.0
        down = (own[:4] + 0.3 * torch.randn(4, self.width, generator=gen)) / (2.0 * self.width)
        up = torch.randn(self.out, 4, generator=gen) * 0.5
        return own, up @ down

    def rows(self, index: int, own: torch.Tensor, chunk: int, n: int, shared: int = 0) -> torch.Tensor:
        gen = _generator(*self.key, 3, index, chunk)
        z_common = torch.randn(n, self.common.shape[0], generator=gen)
        z_own = torch.randn(n, own.shape[0], generator=gen)
        noise = torch.randn(n, self.width, generator=gen) * 0.05
        x = z_common @ self.common + z_own @ own + noise
        if shared:
            # the same prefix for every concept and layer variant (keyed by prompt kind only: the two
            # solved prompts, the two held-out ones), after the BOS row every prompt shares, of
            # outsized norm as in CLIP; plus a 1 % concept-specific drift
            kind = chunk % 2 + 2 * (chunk // HELD_OUT_CHUNK)
            prefix = torch.randn(shared, self.common.shape[0], generator=_generator(*self.key, 4, kind)) @ self.common
            prefix[0] = 10.0 * torch.randn(self.common.shape[0], generator=_generator(*self.key, 5)) @ self.common
            x[:shared] = prefix * (1.0 + 0.01 * torch.randn(shared, 1, generator=gen)) + noise[:shared] * 0.2
        return x


def _shared(stage: Stage, chunk: int) -> int:
    return stage.shared[chunk] if stage.shared else 0


def _held_out_rows(layer: _Layer, stage: Stage, concept: int, own: torch.Tensor, validation: bool = False
                   ) -> list[torch.Tensor]:
    """Rows of the held-out (report) or validation (ridge choice) chunks of one concept."""
    sizes, shared = (stage.validation, stage.validation_shared) if validation else (stage.held_out, stage.held_out_shared)
    start = VALIDATION_CHUNK if validation else HELD_OUT_CHUNK
    return [layer.rows(concept, own, start + j, n, s) for j, (n, s) in enumerate(zip(sizes, shared or (0,) * len(sizes)))]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------- workers
def _worker_exact(args: argparse.Namespace, stage: Stage, stage_id: int) -> dict:
    """All layers' statistics live at once while concepts stream past, as during a real fusion;
    with the held-out check (not --lean, not --no-held-out) held-out rows stream into report-only
    statistics next to them."""
    layer_ids = range(len(stage.shapes)) if args.layers is None else range(min(args.layers, len(stage.shapes)))
    layers = [_Layer(args.seed, stage_id, i, stage.shapes[i]) for i in layer_ids]
    w0s = [_base_weight(args.seed, stage_id, i, stage.shapes[i]) for i in layer_ids]
    rss_base = _peak_rss_mb()
    # as lib_mos.fusion runs it: dense float64 G and S for the solve (raw rows for k/v, 6 per
    # concept), float32 per-concept report statistics spilled after each concept (none: --lean)
    spill = tempfile.TemporaryDirectory(prefix="mos-bench-")
    stats = [LayerStats(w0, keep_per_concept=not args.lean, per_concept_dtype=torch.float32,
                        dense=stage.name != "kv") for w0 in w0s]
    held_out = not args.lean and not args.no_held_out
    held = [LayerStats.held_out_for(st) for st in stats] if held_out else []
    valid = [LayerStats.held_out_for(st) for st in stats] if held_out else []  # the fusion's default
    accumulate_s = held_s = 0.0
    peak_stats = 0
    for c in range(args.concepts):
        for k, (layer, layer_stats) in enumerate(zip(layers, stats)):
            own, delta = layer.concept(c)
            chunks = [layer.rows(c, own, j, n, _shared(stage, j)) for j, n in enumerate(stage.chunks)]
            unseen = _held_out_rows(layer, stage, c, own) if held_out else []
            checks = _held_out_rows(layer, stage, c, own, validation=True) if held_out else []
            t0 = time.perf_counter()
            delta = delta.to(torch.float64)
            layer_stats.begin_concept(delta=delta, copy=False)
            for x in chunks:
                layer_stats.add(x)
            t1 = time.perf_counter()
            if held_out:
                for target, rows in ((held[k], unseen), (valid[k], checks)):
                    target.begin_concept(delta=delta, copy=False)
                    for x in rows:
                        target.add(x)
            t2 = time.perf_counter()
            # both open at once, as in the fusion (the hooks feed them from one batch); not timed
            shared = {t.data_ptr(): t.numel() * t.element_size()  # the open delta is one tensor for all three
                      for st in (*stats, *held, *valid) for t in st.held_tensors()}
            peak_stats = max(peak_stats, sum(shared.values()))
            t3 = time.perf_counter()
            if held_out:
                for target in (held[k], valid[k]):
                    target.end_concept()
                    target.spill(Path(spill.name))
            t4 = time.perf_counter()
            layer_stats.end_concept()
            if not args.lean:
                layer_stats.spill(Path(spill.name))
            accumulate_s += (t1 - t0) + (time.perf_counter() - t4)
            held_s += (t2 - t1) + (t4 - t3)
    stats_mb = sum(s.nbytes() for s in stats) / 2**20
    t0 = time.perf_counter()
    fused = [solve_exact(s, validation=v) for s, v in zip(stats, valid or [None] * len(stats))]
    solve_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # the engine's report: fused and weight-averaged errors per concept, one read of each concept
    report = [relative_errors_many([w, weight_average(s)], s) for w, s in zip(fused, stats)] if not args.lean else []
    report_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    unseen = [relative_errors_many([w, weight_average(s)], h) for w, s, h in zip(fused, stats, held)]
    held_report_s = time.perf_counter() - t0
    out = {"layers": len(stats), "layers_full": len(stage.shapes), "exact_s": accumulate_s + solve_s,
           "exact_accumulate_s": accumulate_s, "exact_solve_s": solve_s, "report_s": report_s,
           "exact_s_per_layer": (accumulate_s + solve_s) / len(stats), "stats_mb": round(stats_mb, 1),
           "peak_stats_mb": round(peak_stats / 2**20, 1), "keep_per_concept": not args.lean,
           "held_out": held_out, "rss_base_mb": round(rss_base, 1), "peak_rss_mb_exact": round(_peak_rss_mb(), 1)}
    if held_out:
        out.update({"held_out_accumulate_s": held_s, "held_out_report_s": held_report_s,
                    "validation_rows_per_concept_per_layer": sum(stage.validation),
                    "held_out_rows_per_concept_per_layer": sum(stage.held_out),
                    "held_out_relerr_mean_fused": sum(sum(u[0]) for u in unseen) / (len(unseen) * args.concepts),
                    "held_out_relerr_mean_average": sum(sum(u[1]) for u in unseen) / (len(unseen) * args.concepts)})
    del fused, report, unseen
    spill.cleanup()
    return out


def _worker_lbfgs(args: argparse.Namespace, stage: Stage, stage_id: int) -> dict:
    """The authors' way on the first `--lbfgs-layers` layers: store every activation, then LBFGS."""
    count = min(args.lbfgs_layers, len(stage.shapes))
    total = len(stage.shapes)
    # spread over the stage so mixed widths (kv: out 320..1280) are represented
    picks = [total // 2] if count == 1 else [round(k * (total - 1) / (count - 1)) for k in range(count)]
    rss_base = _peak_rss_mb()
    lbfgs_s, evals = 0.0, 0
    methods = ("exact", "unregularised", "lbfgs", "average")
    totals = dict.fromkeys(methods, 0.0)
    worst = dict.fromkeys(methods, 0.0)
    unseen = dict.fromkeys(methods, 0.0)
    stored_mb = 0.0
    for i in picks:
        layer = _Layer(args.seed, stage_id, i, stage.shapes[i])
        w0 = _base_weight(args.seed, stage_id, i, stage.shapes[i])
        xs, targets, held_xs, valid_xs = [], [], [], []
        for c in range(args.concepts):
            own, delta = layer.concept(c)
            xs.append(torch.cat([layer.rows(c, own, j, n, _shared(stage, j))
                                 for j, n in enumerate(stage.chunks)]))
            held_xs.append(torch.cat(_held_out_rows(layer, stage, c, own)))
            valid_xs.append(torch.cat(_held_out_rows(layer, stage, c, own, validation=True)))
            targets.append(w0 + delta)
        stored_mb += sum(x.shape[0] * (x.shape[1] + w0.shape[0]) for x in xs) * 4 / 2**20  # fp32 in + out
        trace: list[float] = []
        t0 = time.perf_counter()
        w_lbfgs = solve_lbfgs(xs, w0, targets, iterations=stage.iterations, trace=trace)
        lbfgs_s += time.perf_counter() - t0
        evals += len(trace)
        # the same activations, streamed: our solution and the report's numbers
        stats = LayerStats(w0)
        held, valid = LayerStats.held_out_for(stats), LayerStats.held_out_for(stats)
        for c, x in enumerate(xs):
            for target, rows in ((stats, x), (held, held_xs[c]), (valid, valid_xs[c])):
                target.begin_concept(delta=targets[c] - w0)
                target.add(rows)
                target.end_concept()
        candidates = {"exact": solve_exact(stats, validation=valid),
                      "unregularised": solve_exact(stats, ridge=1e-8, prior="base", max_change=None),
                      "lbfgs": w_lbfgs, "average": weight_average(stats)}
        for key, w in candidates.items():
            totals[key] += objective(w, stats)
            worst[key] = max(worst[key], *relative_errors(w, stats))
            unseen[key] += sum(relative_errors(w, held)) / (count * args.concepts)
    return {"lbfgs_layers": count, "lbfgs_layer_ids": picks, "lbfgs_iterations": stage.iterations, "lbfgs_s": lbfgs_s,
            "lbfgs_s_per_layer": lbfgs_s / count, "lbfgs_evals_per_layer": evals / count,
            "objective_exact": totals["exact"], "objective_lbfgs": totals["lbfgs"],
            "objective_average": totals["average"],
            "objective_ratio_lbfgs_to_exact": totals["lbfgs"] / totals["exact"] if totals["exact"] else None,
            "relerr_max_exact": worst["exact"], "relerr_max_lbfgs": worst["lbfgs"],
            "relerr_max_average": worst["average"], "objective_unregularised": totals["unregularised"],
            **{f"held_out_relerr_mean_{key}": value for key, value in unseen.items()},
            "lbfgs_stored_activations_mb": round(stored_mb, 1),
            "rss_base_mb_lbfgs": round(rss_base, 1), "peak_rss_mb_lbfgs": round(_peak_rss_mb(), 1)}


def _authors_store_mb(stage: Stage, concepts: int) -> float:
    """What the authors hold for the whole stage: inputs and outputs of every row, recorded fp16."""
    rows = sum(stage.chunks) * concepts
    return sum(rows * (out + width) * 2 for out, width in stage.shapes) / 2**20


# ---------------------------------------------------------------------------- the child process
def _rss_mb() -> float:
    """Resident memory now (not the peak): what a long-lived WebUI keeps after a fusion."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _process_files(model: str, folder: Path) -> tuple[Path, list[Path]]:
    """A base checkpoint (the tiny model, or the random full-size SD1.5 of the real-host suite)
    and two random concepts for it."""
    from lib_mos.concepts import synthetic
    from lib_mos.concepts.files import write_concept
    from lib_mos.models import sd1

    if model == "tiny":
        base = folder / "tiny-sd1.safetensors"
        sd1.save_checkpoint(sd1.build_tiny_sd1(0), base)
    else:  # the real-host suite's checkpoint, in its cache
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "realhost"))
        from sd15_checkpoint import write_random_sd15

        base = Path.home() / ".cache" / "lib_mos" / "realhost" / "sd15-random-seed0.safetensors"
        if not base.exists():
            write_random_sd15(base, seed=0)
    loaded = sd1.load_checkpoint(base)
    concepts = [write_concept(synthetic.random_concept(loaded, (f"<c{k}a>", f"<c{k}b>"), seed=k + 1, name=f"c{k}"),
                              folder / f"c{k}.safetensors") for k in range(2)]
    return base, concepts


def _worker_process(args: argparse.Namespace) -> dict:
    """One fusion, in this process (as the tab used to) or in a child (as it does now): wall time,
    this process's RSS before and after, the peaks."""
    import gc

    from lib_mos.fusion import checkpoint as fused_checkpoint
    from lib_mos.fusion import pipeline as fusion
    from lib_mos.fusion.process import run_fusion_process

    out = Path(args.out)
    fuse_args = ["--base", args.base, "--spatial-steps", "1", "--spatial-size", "256", "--spatial-seeds", "1"]
    for c in args.concept:
        fuse_args += ["--concept", c]
    before = _rss_mb()
    t0 = time.perf_counter()
    if args.method == "child":
        run_fusion_process(fuse_args, out, cwd=Path(__file__).resolve().parents[1])
        child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    else:
        settings = fusion.FusionSettings(spatial_steps=1, spatial_size=256, spatial_seeds=1)
        fused_checkpoint.fuse_checkpoint(args.base, [fused_checkpoint.parse_concept_spec(c) for c in args.concept], out, settings)
        child_peak = None
    seconds = time.perf_counter() - t0
    gc.collect()
    return {"method": args.method, "seconds": seconds, "rss_before_mb": round(before, 1),
            "rss_after_mb": round(_rss_mb(), 1), "peak_rss_mb": round(_peak_rss_mb(), 1),
            "child_peak_rss_mb": None if child_peak is None else round(child_peak, 1)}


def _bench_process(args: argparse.Namespace) -> None:
    """In-process fusion against the child process, each in a fresh worker, alternating."""
    with tempfile.TemporaryDirectory(prefix="mos-bench-process-") as tmp:
        folder = Path(tmp)
        # in a worker of its own: peak RSS survives fork and exec on Linux, so the model loaded to
        # make the concepts would show as every later worker's peak
        made = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--method", "files",
                               "--process", args.process, "--out", str(folder)],
                              capture_output=True, text=True, check=False)
        if made.returncode != 0:
            sys.stderr.write(made.stderr)
            raise SystemExit("could not write the base and concept files")
        base, *concepts = json.loads(made.stdout.splitlines()[-1])
        print(f"# {args.process}: {base}; spatial 1 step, 256 px, 1 seed; {args.repeat} run(s) each", file=sys.stderr)
        for run in range(args.repeat):
            for method in ("inprocess", "child"):
                out = folder / f"fused-{method}-{run}.safetensors"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--method", method,
                       "--base", str(base), "--out", str(out), *(a for c in concepts for a in ("--concept", str(c)))]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    sys.stderr.write(done.stderr)
                    raise SystemExit(f"worker failed: {' '.join(cmd)}")
                out.unlink()
                print(json.dumps({"model": args.process, "run": run, **json.loads(done.stdout.splitlines()[-1])}),
                      flush=True)


# ------------------------------------------------------------------------------- whole fusions by family
def _family_files(family: str, folder: Path) -> tuple[Path, list[Path]]:
    """The real-host suite's random full-size base of the family (in its cache, written once) and
    two random full-size ED-LoRA concepts for it, made on the meta skeleton (no weights read)."""
    from lib_mos.concepts import synthetic
    from lib_mos.concepts.files import write_concept
    from lib_mos.models import sd1, sdxl

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "realhost"))
    from sd15_checkpoint import write_random_sd15, write_random_sdxl

    cache = Path.home() / ".cache" / "lib_mos" / "realhost"
    cache.mkdir(parents=True, exist_ok=True)
    if family == "sdxl":
        base, write, skeleton = cache / "sdxl-random-seed0.safetensors", write_random_sdxl, sdxl.build_sdxl_skeleton()
        from lib_mos.models.clip_tokenizer import load_clip_tokenizer

        skeleton.tokenizer = load_clip_tokenizer()
    else:
        base, write, skeleton = cache / "sd15-random-seed0.safetensors", write_random_sd15, sd1.build_sd15_skeleton()
    if not base.exists():
        write(base, seed=0)
    concepts = [write_concept(synthetic.random_concept(skeleton, (f"<c{k}a>", f"<c{k}b>"), seed=k + 1, name=f"c{k}"),
                              folder / f"c{k}.safetensors") for k in range(2)]
    return base, concepts


def _bench_family(args: argparse.Namespace) -> None:
    """One whole fusion of two full-size ED-LoRA concepts in the CLI's child process under
    --memory-gb: one JSON line per stage (its seconds and the process's peak RSS from its start to
    the stage's end), then the whole process's peak (the kernel's figure for the child, loading
    and writing included)."""
    from lib_mos.fusion.process import run_fusion_process

    with tempfile.TemporaryDirectory(prefix="mos-bench-family-") as tmp:
        folder = Path(tmp)
        made = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--method", "familyfiles",
                               "--family", args.family, "--out", str(folder)], capture_output=True, text=True,
                              check=False)
        if made.returncode != 0:
            sys.stderr.write(made.stderr)
            raise SystemExit("could not write the base and concept files")
        base, *concepts = json.loads(made.stdout.splitlines()[-1])
        size = args.spatial_size or 256
        steps = args.spatial_steps or 1
        fuse_args = ["--base", base, "--spatial-steps", str(steps), "--spatial-size", str(size),
                     "--spatial-seeds", str(args.seeds), "--check-steps", str(args.check_steps),
                     "--memory-gb", str(args.memory_gb), *(a for c in concepts for a in ("--concept", c))]
        print(f"# {args.family}: {base}; spatial {steps} step(s), {size} px, {args.seeds} seed(s); picture check "
              f"{args.check_steps} step(s); --memory-gb {args.memory_gb}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = run_fusion_process(fuse_args, folder / "fused.safetensors", cwd=Path(__file__).resolve().parents[1],
                                    progress=lambda what, done, total: print(f"# {what} {done}/{total}",
                                                                             file=sys.stderr, flush=True))
        seconds = time.perf_counter() - t0
        whole = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        for stage, value in result["seconds"].items():
            print(json.dumps({"family": args.family, "stage": stage, "seconds": round(value, 1),
                              "peak_rss_mb": result.get("peak_rss_mb", {}).get(stage)}), flush=True)
        print(json.dumps({"family": args.family, "stage": "whole process", "seconds": round(seconds, 1),
                          "peak_rss_mb": round(whole, 1), "memory_gb": args.memory_gb,
                          "within_budget": whole <= args.memory_gb * 1024}), flush=True)


# ------------------------------------------------------------------------------- the mixed set
MIXED_KINDS = ("edlora", "locon", "loha", "lora")  # concept k is of kind k % 4
_MIXED_STAGES = ("te", "kv", "spatial")
_NOUNS = ("dog", "cat", "bird", "car", "tree", "house", "boat", "lamp")
# --quick: the first and last transformer block and resnet, the first and last text-encoder layer
_QUICK_UNET = ("input_blocks.1.", "output_blocks.11.")
_QUICK_TEXT = ("text_model.encoder.layers.0.", "text_model.encoder.layers.11.")


def _mixed_model(name: str, seed: int):
    """The tiny model, or "mid": SD1.5's text encoder at full size and the SD1 UNet at 64 channels."""
    from lib_mos.models import sd1

    if name == "tiny":
        return sd1.build_tiny_sd1(seed)
    from lib_mos.models.clip_tokenizer import load_clip_tokenizer

    config = sd1.SD1Config(model_channels=64)
    with torch.random.fork_rng(devices=[]):
        unet, text = sd1.build_unet(config), sd1.build_text_encoder(config)
    gen = torch.Generator().manual_seed(seed)
    sd1._randomise(unet, gen)  # N(0, 1/fan_in) weights, as the tiny model's
    sd1._randomise(text, gen)
    return sd1.SD1Model(unet.float().eval(), text.float().eval(), load_clip_tokenizer(), sd1.sd1_alphas_cumprod(),
                        config)


def _mixed_concepts(model, count: int, quick: bool) -> list:
    """`count` concepts, kind k % 4 of MIXED_KINDS, each with its own seed, tokens or trigger words."""
    from lib_mos.concepts import synthetic
    from lib_mos.models import sd1

    def keep(names: list[str], prefixes: tuple[str, ...]) -> list[str]:
        return [n for n in names if n.startswith(prefixes)] if quick else names

    concepts = []
    for k in range(count):
        kind = MIXED_KINDS[k % len(MIXED_KINDS)]
        seed = 1000 + k
        if kind == "edlora":
            text_names = sd1.text_attention_linear_names(model.config.text_layers)
            concepts.append(synthetic.random_concept(
                model, (f"<c{k}a>", f"<c{k}b>"), seed=seed, name=f"c{k}-edlora",
                unet_names=keep(sd1.unet_attention_linear_names(), _QUICK_UNET),
                text_names=keep(text_names, _QUICK_TEXT)))
        else:
            unet_names, text_names = synthetic.lora_layer_names(model, kind)
            concepts.append(synthetic.random_lora_concept(
                model, kind, triggers=(f"ohwx{k} {_NOUNS[k % len(_NOUNS)]}",), seed=seed, name=f"c{k}-{kind}",
                unet_names=keep(unet_names, _QUICK_UNET), text_names=keep(text_names, _QUICK_TEXT)))
    return concepts


def _mixed_worker(args: argparse.Namespace) -> dict:
    """One stage of one fusion, alone in this process (see the module docstring)."""
    import gc

    from safetensors import safe_open
    from safetensors.torch import save_file

    from lib_mos.fusion import pipeline as fusion

    stage = args.stages[0]
    count = args.concepts[0]
    handoff = Path(args.out)
    t0 = time.perf_counter()
    model = _mixed_model(args.model, args.seed)
    concepts = _mixed_concepts(model, count, args.quick)
    # the earlier stages' fused weights, as fuse() holds them while it runs this stage
    for earlier, root in (("te", model.text_encoder), ("kv", model.unet)):
        if _MIXED_STAGES.index(earlier) < _MIXED_STAGES.index(stage):
            with safe_open(str(handoff / f"{earlier}-{count}.safetensors"), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    name, attr = key.rsplit(".", 1)
                    param = getattr(root.get_submodule(name), attr)
                    param.data.copy_(f.get_tensor(key).reshape(param.shape))
    setup_s = time.perf_counter() - t0
    gc.collect()
    rss_setup = _rss_mb()
    passes = {"count": 0}

    def progress(what: str, done: int, total: int) -> None:
        if what.startswith("spatial"):
            found = re.search(r"\(pass \d+/(\d+)\)", what)
            passes["count"] = int(found[1]) if found else 1

    settings = fusion.FusionSettings(spatial_steps=args.spatial_steps, spatial_size=args.spatial_size,
                                     spatial_seeds=args.seeds, seed=args.seed, memory_gb=args.memory_gb,
                                     skip=tuple(s for s in _MIXED_STAGES if s != stage))
    result = fusion.fuse(model, [fusion.FusionInput(c) for c in concepts], settings, progress=progress)
    peak = _peak_rss_mb()
    fused = {f"{n}.weight": w for n, w in (result.text_weights if stage == "te" else result.unet_weights).items()}
    fused |= {f"{n}.bias": b for n, b in (result.text_biases if stage == "te" else result.unet_biases).items()}
    if stage != "spatial":
        save_file({k: v.contiguous() for k, v in fused.items()}, str(handoff / f"{stage}-{count}.safetensors"))
    rows = [r for r in result.report if r["stage"] == stage]

    def mean(key: str, kind: str | None = None) -> float | None:
        values = [r[key] for r, c in zip(rows, concepts) if kind is None or c.name.endswith("-" + kind)]
        return sum(values) / len(values) if values and None not in values else None

    kinds = [k for k in MIXED_KINDS if any(c.name.endswith("-" + k) for c in concepts)]
    return {"model": args.model, "concepts": count, "kinds": [c.name.rsplit("-", 1)[1] for c in concepts],
            "stage": stage, "layers": rows[0]["layers"] if rows else 0,
            "conv3x3_layers": sum(getattr(model.unet.get_submodule(n), "kernel_size", (1, 1)) != (1, 1)
                               for n in {n.rsplit(".", 1)[0] for n in fused}) if stage == "spatial" else 0,
            "spatial_passes": passes["count"] if stage == "spatial" else None,
            "seconds": result.seconds.get(stage, 0.0), "setup_s": setup_s,
            "rss_setup_mb": round(rss_setup, 1), "peak_rss_mb": round(peak, 1),
            "held_out_fused": mean("held_out"), "held_out_averaged": mean("held_out_average"),
            "held_out_stacked": mean("held_out_stacked"), "recorded_fused": mean("fused"),
            "held_out_by_kind": {k: {"fused": mean("held_out", k), "averaged": mean("held_out_average", k),
                                     "stacked": mean("held_out_stacked", k)} for k in kinds},
            "flagged": sum(bool(r["flags"]) for r in rows), "warnings": len(result.warnings),
            "spatial": {"size": args.spatial_size, "steps": args.spatial_steps, "seeds": args.seeds,
                        "memory_gb": args.memory_gb},
            "mmap_threshold": int(os.environ.get("MALLOC_MMAP_THRESHOLD_", 0)) or "glibc default"}


def _bench_mixed(args: argparse.Namespace) -> None:
    """Every concept count, stage by stage, each stage in a fresh worker (`_mixed_worker`)."""
    peaks: dict[int, dict[str, float]] = {}
    print(f"# --mixed: model {args.model}, concepts {args.concepts}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="mos-bench-mixed-") as handoff:
        for count in args.concepts:
            for stage in _MIXED_STAGES:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--method", "mixed", "--mixed",
                       "--model", args.model, "--concepts", str(count), "--stages", stage, "--out", handoff,
                       "--spatial-steps", str(args.spatial_steps), "--spatial-size", str(args.spatial_size),
                       "--seeds", str(args.seeds), "--memory-gb", str(args.memory_gb), "--seed", str(args.seed)]
                if args.quick:
                    cmd.append("--quick")
                env = dict(os.environ)
                env.pop("MALLOC_MMAP_THRESHOLD_", None)
                if args.mmap_threshold:
                    env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
                done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
                if done.returncode != 0:
                    sys.stderr.write(done.stderr)
                    raise SystemExit(f"worker failed: {' '.join(cmd)}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                peaks.setdefault(count, {})[stage] = row["peak_rss_mb"]
                print(json.dumps(_rounded(row)), flush=True)
    low, high = min(args.concepts), max(args.concepts)
    if low != high:
        ratios = {stage: peaks[high][stage] / peaks[low][stage] for stage in _MIXED_STAGES}
        whole = max(peaks[high].values()) / max(peaks[low].values())
        print(json.dumps(_rounded({
            "summary": f"peak RSS, {high} vs {low} concepts", "model": args.model,
            "mmap_threshold": args.mmap_threshold or "glibc default",
            "peak_rss_mb": {str(c): peaks[c] for c in (low, high)}, "peak_rss_ratio": ratios,
            "fusion_peak_rss_ratio": whole, "within_10_percent": abs(whole - 1.0) <= 0.10,
            "stages_within_10_percent": [s for s, r in ratios.items() if abs(r - 1.0) <= 0.10]})), flush=True)


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


# -------------------------------------------------------------------------------------------- main
def _run_worker(args: argparse.Namespace, concepts: int, stage: str, method: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--concepts", str(concepts),
           "--stages", stage, "--method", method, "--seed", str(args.seed),
           "--lbfgs-layers", str(args.lbfgs_layers), "--spatial-steps", str(args.spatial_steps),
           "--seeds", str(args.seeds)]
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    if args.lean:
        cmd.append("--lean")
    if args.no_held_out:
        cmd.append("--no-held-out")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"worker failed: {' '.join(cmd)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stage_names(args: argparse.Namespace) -> list[str]:
    names = []
    for name in args.stages:
        names += [f"spatial{w}" for w in _SPATIAL] if name == "spatial" else [name]
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, nargs="+", default=None, help="concept counts (default 2 4 8; --mixed: 2 8)")
    ap.add_argument("--stages", nargs="+", default=["te", "kv", "spatial"],
                    help="te, kv, spatial (= spatial320 spatial640 spatial1280) or one spatialW")
    ap.add_argument("--lbfgs-layers", type=int, default=1,
                    help="layers per stage the LBFGS reference runs on; its stage time is extrapolated")
    ap.add_argument("--layers", type=int, default=None,
                    help="cap the layers the exact side fuses per stage (default: te/kv all, spatial 2)")
    ap.add_argument("--spatial-steps", type=int, default=None,
                    help="sampling steps recorded (authors: 20; default 4; --mixed: 2, with --quick 1)")
    ap.add_argument("--seeds", type=int, default=4, help="noise seeds per concept in the spatial stage (authors: 1)")
    ap.add_argument("--no-held-out", action="store_true",
                    help="exact side without validation and held-out rows (a fixed ridge, no held-out errors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lean", action="store_true", help="exact side without per-concept statistics")
    ap.add_argument("--quick", action="store_true",
                    help="1 LBFGS layer per stage, 1 spatial step, 1 spatial layer per width")
    ap.add_argument("--process", choices=["tiny", "sd15"],
                    help="instead: a whole fusion in this process against one in a child process (as the "
                         "tab runs it): time, the parent's RSS after, the peaks")
    ap.add_argument("--repeat", type=int, default=1, help="with --process: runs of each")
    ap.add_argument("--mixed", action="store_true",
                    help="instead: the real fuse() on a mixed set (ED-LoRA, LoCon, LoHa, LoRA concepts), per concept "
                         "count and stage in a fresh process: time, peak RSS, layers, passes, held-out errors")
    ap.add_argument("--model", choices=["tiny", "mid"], default=None,
                    help="with --mixed: the model (default mid; --quick: tiny)")
    ap.add_argument("--spatial-size", type=int, default=None, help="with --mixed: spatial sampling size in px")
    ap.add_argument("--memory-gb", type=float, default=8.0,
                    help="with --mixed: FusionSettings.memory_gb (spatial statistics held at once)")
    ap.add_argument("--mmap-threshold", type=int, default=4 << 20, metavar="BYTES",
                    help="with --mixed: run the workers with glibc's MALLOC_MMAP_THRESHOLD_=BYTES (a fixed "
                         "threshold: every buffer that large is mapped on its own and goes back to the system when "
                         "freed); default 4 MiB, what `python -m lib_mos fuse` (and so the tab) sets for itself; "
                         "0: glibc's own dynamic threshold")
    ap.add_argument("--family", choices=["sd1", "sdxl"], default=None,
                    help="one whole fusion of two full-size random ED-LoRA concepts in the CLI's child process "
                         "under --memory-gb (spatial defaults: 1 step, 256 px; --seeds 1 recommended): seconds and "
                         "peak RSS per stage, and the whole process's peak")
    ap.add_argument("--check-steps", type=int, default=1, help="with --family: the picture check's steps")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=["exact", "lbfgs", "inprocess", "child", "files", "mixed", "familyfiles"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--concept", action="append", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mixed:
        args.concepts = args.concepts or [2, 8]
        args.model = args.model or ("tiny" if args.quick else "mid")
        args.spatial_steps = args.spatial_steps or (1 if args.quick else 2)
        args.spatial_size = args.spatial_size or (64 if args.model == "tiny" else 128)
        if args.worker:
            print(json.dumps(_mixed_worker(args)))
        else:
            _bench_mixed(args)
        return
    if args.worker and args.method == "familyfiles":
        base, concepts = _family_files(args.family, Path(args.out))
        print(json.dumps([str(base), *map(str, concepts)]))
        return
    if args.family:
        _bench_family(args)
        return
    args.concepts = args.concepts or [2, 4, 8]
    args.spatial_steps = args.spatial_steps or 4

    if args.worker and args.method == "files":
        base, concepts = _process_files(args.process, Path(args.out))
        print(json.dumps([str(base), *map(str, concepts)]))
        return
    if args.process:
        _bench_process(args)
        return
    if args.worker and args.method in ("inprocess", "child"):
        print(json.dumps(_worker_process(args)))
        return
    if args.worker:
        args.concepts = args.concepts[0]
        name = args.stages[0]
        stage = _stage(name, args.spatial_steps, args.seeds)
        stage_id = ["te", "kv", *(f"spatial{w}" for w in _SPATIAL)].index(name)
        if args.layers is None and name.startswith("spatial"):
            args.layers = 2
        run = _worker_exact if args.method == "exact" else _worker_lbfgs
        print(json.dumps(run(args, stage, stage_id)))
        return

    if args.quick:
        args.lbfgs_layers = 1
        args.spatial_steps = 1
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; LBFGS stage times are "
          f"extrapolated from --lbfgs-layers {args.lbfgs_layers}", file=sys.stderr)
    for concepts in args.concepts:
        for name in _stage_names(args):
            stage = _stage(name, args.spatial_steps, args.seeds)
            base = argparse.Namespace(**{**vars(args), "layers": 1}) if (
                args.quick and name.startswith("spatial") and args.layers is None) else args
            exact = _run_worker(base, concepts, name, "exact")
            cost = {}
            if not args.lean and not args.no_held_out:  # the held-out check's cost: the same run without it
                plain = _run_worker(argparse.Namespace(**{**vars(base), "no_held_out": True}), concepts, name, "exact")
                extra_s = (exact["held_out_accumulate_s"] + exact["held_out_report_s"]
                           + exact["exact_solve_s"] - plain["exact_solve_s"])  # recording, ridge choice, report
                cost = {"held_out_s_stage_extrapolated": extra_s * exact["layers_full"] / exact["layers"],
                        "held_out_extra_peak_stats_mb": round(exact["peak_stats_mb"] - plain["peak_stats_mb"], 1),
                        "held_out_extra_peak_rss_mb": round(exact["peak_rss_mb_exact"] - plain["peak_rss_mb_exact"], 1)}
            ref = _run_worker(args, concepts, name, "lbfgs")
            full = exact["layers_full"]
            row = {"concepts": concepts, "stage": name, "rows_per_concept_per_layer": sum(stage.chunks),
                   **exact, **cost, "exact_s_stage_extrapolated": exact["exact_s_per_layer"] * full,
                   **ref, "lbfgs_s_stage_extrapolated": ref["lbfgs_s_per_layer"] * full,
                   "extrapolated": ["exact_s_stage_extrapolated", "lbfgs_s_stage_extrapolated"],
                   "speedup": ref["lbfgs_s_per_layer"] / exact["exact_s_per_layer"],
                   "authors_store_mb_stage": round(_authors_store_mb(stage, concepts), 1)}
            print(json.dumps({k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in row.items()}),
                  flush=True)


if __name__ == "__main__":
    main()
