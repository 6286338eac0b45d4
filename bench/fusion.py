"""Benchmark: exact gradient fusion (streamed Gram statistics + Cholesky) against the authors' LBFGS
on full-size SD1.5 layer shapes with random weights and seeded synthetic concepts, on this CPU.

    .venv/bin/python bench/fusion.py --quick
    .venv/bin/python bench/fusion.py --concepts 2 4 8 --lbfgs-layers 2 --spatial-steps 4

Stages as the authors run them (docs/method.md): "te" = 48 text-encoder linears 768x768,
~176 rows per concept per layer, 500 LBFGS iterations; "kv" = 32 attn2 to_k/to_v (in 768, out
320/640/1280), 6 rows per concept per layer (2 prompts x (2 concept tokens + EOS), the layer's own
prompt variant only), 500 iterations; "spatialW" = a sample of the W x W spatial linears of width W
(30/30/36 in SD1.5) with 4096/1024/256 rows per sampling step, 50 iterations.

Every (concept count, stage, method) runs in a fresh subprocess (`--worker`) so peak RSS values do
not mix. The exact side streams activations through LayerStats for all layers of the stage at
once, as hooks would; the LBFGS side stores the activations of `--lbfgs-layers` layers like the
authors and its per-layer time is extrapolated to the stage (marked "extrapolated"). Prints one
JSON line per configuration on stdout; a benchmark reports, it never asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_mos.fusion_solver import (
    LayerStats,
    objective,
    relative_errors,
    relative_errors_many,
    solve_exact,
    solve_lbfgs,
    weight_average,
)


@dataclass(frozen=True)
class Stage:
    """One fusion stage: the layer shapes it fuses and how activations arrive."""

    name: str
    shapes: tuple[tuple[int, int], ...]  # (out, in) per layer of the full stage
    chunks: tuple[int, ...]  # rows per streamed chunk, for one concept and one layer
    iterations: int  # the authors' LBFGS iterations for this stage
    shared: tuple[int, ...] = ()  # leading rows of each chunk that every concept sees (nearly) alike


def _te_stage() -> Stage:
    # 16 layer variants x ("photo of a <a> <b>" = 7 tokens, "<a> <b>" = 4 tokens), one pass per prompt;
    # the causal encoder gives BOS and "photo of a" the same rows in every prompt and concept, up to
    # the small drift that each concept's own LoRAs in earlier layers cause
    return Stage("te", ((768, 768),) * 48, (7, 4) * 16, 500, shared=(4, 1) * 16)


def _kv_stage() -> Stage:
    widths = (320,) * 5 + (640,) * 5 + (1280,) * 6  # attn2 blocks by level, SD1.5
    shapes = tuple((w, 768) for w in widths for _ in ("to_k", "to_v"))
    return Stage("kv", shapes, (3, 3), 500)


_SPATIAL = {320: (30, 4096), 640: (30, 1024), 1280: (36, 256)}  # width: (layers in SD1.5, rows/step)


def _spatial_stage(width: int, steps: int) -> Stage:
    layers, rows = _SPATIAL[width]
    return Stage(f"spatial{width}", ((width, width),) * layers, (rows,) * steps, 50)


def _stage(name: str, steps: int) -> Stage:
    if name == "te":
        return _te_stage()
    if name == "kv":
        return _kv_stage()
    return _spatial_stage(int(name.removeprefix("spatial")), steps)


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
            # the same prefix for every concept and layer variant (keyed by prompt kind only), with a
            # BOS row of outsized norm as in CLIP, plus a 1 % concept-specific drift
            prefix_gen = _generator(*self.key, 4, chunk % 2)
            prefix = torch.randn(shared, self.common.shape[0], generator=prefix_gen) @ self.common
            prefix[0] *= 10.0
            x[:shared] = prefix * (1.0 + 0.01 * torch.randn(shared, 1, generator=gen)) + noise[:shared] * 0.2
        return x


def _shared(stage: Stage, chunk: int) -> int:
    return stage.shared[chunk] if stage.shared else 0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------- workers
def _worker_exact(args: argparse.Namespace, stage: Stage, stage_id: int) -> dict:
    """All layers' statistics live at once while concepts stream past, as during a real fusion."""
    layer_ids = range(len(stage.shapes)) if args.layers is None else range(min(args.layers, len(stage.shapes)))
    layers = [_Layer(args.seed, stage_id, i, stage.shapes[i]) for i in layer_ids]
    w0s = [_base_weight(args.seed, stage_id, i, stage.shapes[i]) for i in layer_ids]
    rss_base = _peak_rss_mb()
    # as lib_mos.fusion runs it: dense float64 G and S for the solve (raw rows for k/v, 6 per
    # concept), float32 per-concept report statistics spilled after each concept (none: --lean)
    spill = tempfile.TemporaryDirectory(prefix="mos-bench-")
    stats = [LayerStats(w0, keep_per_concept=not args.lean, per_concept_dtype=torch.float32,
                        dense=stage.name != "kv") for w0 in w0s]
    accumulate_s = 0.0
    for c in range(args.concepts):
        for layer, layer_stats in zip(layers, stats):
            own, delta = layer.concept(c)
            chunks = [layer.rows(c, own, j, n, _shared(stage, j)) for j, n in enumerate(stage.chunks)]
            t0 = time.perf_counter()
            layer_stats.begin_concept(delta=delta)
            for x in chunks:
                layer_stats.add(x)
            layer_stats.end_concept()
            if not args.lean:
                layer_stats.spill(Path(spill.name))
            accumulate_s += time.perf_counter() - t0
    stats_mb = sum(s.nbytes() for s in stats) / 2**20
    t0 = time.perf_counter()
    fused = [solve_exact(s) for s in stats]
    solve_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # the engine's report: fused and weight-averaged errors per concept, one read of each concept
    report = [relative_errors_many([w, weight_average(s)], s) for w, s in zip(fused, stats)] if not args.lean else []
    report_s = time.perf_counter() - t0
    del fused, report
    spill.cleanup()
    n = len(stats)
    return {"layers": n, "layers_full": len(stage.shapes), "exact_s": accumulate_s + solve_s,
            "exact_accumulate_s": accumulate_s, "exact_solve_s": solve_s, "report_s": report_s,
            "exact_s_per_layer": (accumulate_s + solve_s) / n, "stats_mb": round(stats_mb, 1),
            "keep_per_concept": not args.lean, "rss_base_mb": round(rss_base, 1),
            "peak_rss_mb_exact": round(_peak_rss_mb(), 1)}


def _worker_lbfgs(args: argparse.Namespace, stage: Stage, stage_id: int) -> dict:
    """The authors' way on the first `--lbfgs-layers` layers: store every activation, then LBFGS."""
    count = min(args.lbfgs_layers, len(stage.shapes))
    total = len(stage.shapes)
    # spread over the stage so mixed widths (kv: out 320..1280) are represented
    picks = [total // 2] if count == 1 else [round(k * (total - 1) / (count - 1)) for k in range(count)]
    rss_base = _peak_rss_mb()
    lbfgs_s, evals = 0.0, 0
    totals = {"exact": 0.0, "lbfgs": 0.0, "average": 0.0}
    worst = {"exact": 0.0, "lbfgs": 0.0, "average": 0.0}
    stored_mb = 0.0
    for i in picks:
        layer = _Layer(args.seed, stage_id, i, stage.shapes[i])
        w0 = _base_weight(args.seed, stage_id, i, stage.shapes[i])
        xs, targets = [], []
        for c in range(args.concepts):
            own, delta = layer.concept(c)
            xs.append(torch.cat([layer.rows(c, own, j, n, _shared(stage, j))
                                 for j, n in enumerate(stage.chunks)]))
            targets.append(w0 + delta)
        stored_mb += sum(x.shape[0] * (x.shape[1] + w0.shape[0]) for x in xs) * 4 / 2**20  # fp32 in + out
        trace: list[float] = []
        t0 = time.perf_counter()
        w_lbfgs = solve_lbfgs(xs, w0, targets, iterations=stage.iterations, trace=trace)
        lbfgs_s += time.perf_counter() - t0
        evals += len(trace)
        # the same activations, streamed: our solution and the report's numbers
        stats = LayerStats(w0)
        for c, x in enumerate(xs):
            stats.begin_concept(delta=targets[c] - w0)
            stats.add(x)
            stats.end_concept()
        candidates = {"exact": solve_exact(stats), "lbfgs": w_lbfgs, "average": weight_average(stats)}
        for key, w in candidates.items():
            totals[key] += objective(w, stats)
            worst[key] = max(worst[key], *relative_errors(w, stats))
    return {"lbfgs_layers": count, "lbfgs_layer_ids": picks, "lbfgs_iterations": stage.iterations, "lbfgs_s": lbfgs_s,
            "lbfgs_s_per_layer": lbfgs_s / count, "lbfgs_evals_per_layer": evals / count,
            "objective_exact": totals["exact"], "objective_lbfgs": totals["lbfgs"],
            "objective_average": totals["average"],
            "objective_ratio_lbfgs_to_exact": totals["lbfgs"] / totals["exact"] if totals["exact"] else None,
            "relerr_max_exact": worst["exact"], "relerr_max_lbfgs": worst["lbfgs"],
            "relerr_max_average": worst["average"], "lbfgs_stored_activations_mb": round(stored_mb, 1),
            "rss_base_mb_lbfgs": round(rss_base, 1), "peak_rss_mb_lbfgs": round(_peak_rss_mb(), 1)}


def _authors_store_mb(stage: Stage, concepts: int) -> float:
    """What the authors hold for the whole stage: inputs and outputs of every row, recorded fp16."""
    rows = sum(stage.chunks) * concepts
    return sum(rows * (out + width) * 2 for out, width in stage.shapes) / 2**20


# -------------------------------------------------------------------------------------------- main
def _run_worker(args: argparse.Namespace, concepts: int, stage: str, method: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--concepts", str(concepts),
           "--stages", stage, "--method", method, "--seed", str(args.seed),
           "--lbfgs-layers", str(args.lbfgs_layers), "--spatial-steps", str(args.spatial_steps)]
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    if args.lean:
        cmd.append("--lean")
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
    ap.add_argument("--concepts", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--stages", nargs="+", default=["te", "kv", "spatial"],
                    help="te, kv, spatial (= spatial320 spatial640 spatial1280) or one spatialW")
    ap.add_argument("--lbfgs-layers", type=int, default=1,
                    help="layers per stage the LBFGS reference runs on; its stage time is extrapolated")
    ap.add_argument("--layers", type=int, default=None,
                    help="cap the layers the exact side fuses per stage (default: te/kv all, spatial 2)")
    ap.add_argument("--spatial-steps", type=int, default=4, help="sampling steps recorded (authors: 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lean", action="store_true", help="exact side without per-concept statistics")
    ap.add_argument("--quick", action="store_true",
                    help="1 LBFGS layer per stage, 1 spatial step, 1 spatial layer per width")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=["exact", "lbfgs"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        args.concepts = args.concepts[0]
        name = args.stages[0]
        stage = _stage(name, args.spatial_steps)
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
            stage = _stage(name, args.spatial_steps)
            if args.quick and name.startswith("spatial") and args.layers is None:
                exact = _run_worker(argparse.Namespace(**{**vars(args), "layers": 1}), concepts, name, "exact")
            else:
                exact = _run_worker(args, concepts, name, "exact")
            ref = _run_worker(args, concepts, name, "lbfgs")
            full = exact["layers_full"]
            row = {"concepts": concepts, "stage": name, "rows_per_concept_per_layer": sum(stage.chunks),
                   **exact, "exact_s_stage_extrapolated": exact["exact_s_per_layer"] * full,
                   **ref, "lbfgs_s_stage_extrapolated": ref["lbfgs_s_per_layer"] * full,
                   "extrapolated": ["exact_s_stage_extrapolated", "lbfgs_s_stage_extrapolated"],
                   "speedup": ref["lbfgs_s_per_layer"] / exact["exact_s_per_layer"],
                   "authors_store_mb_stage": round(_authors_store_mb(stage, concepts), 1)}
            print(json.dumps({k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in row.items()}),
                  flush=True)


if __name__ == "__main__":
    main()
