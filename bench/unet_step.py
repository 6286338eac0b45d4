"""Baseline: one CFG denoising step (cond + uncond rows) of a full-size SD1.5 UNet with random
weights on this machine's CPU. Later benchmarks (regional attention) compare against this.

    .venv/bin/python bench/unet_step.py --size 256 --repeats 3

Prints one JSON line per configuration; a benchmark reports, it never asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_mos.models import sd1


def materialize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give a meta-device module real random weights (N(0, 1/fan_in)) without a second copy."""
    module = module.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.normal_(0, fan_in**-0.5 if p.dim() > 1 else 0.02, generator=gen)
    return module.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs="+", default=[256], help="image side in pixels (latent = size/8)")
    ap.add_argument("--batch", type=int, default=1, help="images per step (UNet rows = 2 x batch)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    t0 = time.perf_counter()
    unet = materialize(sd1.build_sd15_skeleton().unet)
    build_s = time.perf_counter() - t0
    for size in args.size:
        rows = 2 * args.batch
        x = torch.randn(rows, 4, size // 8, size // 8)
        ctx = torch.randn(rows, 77, 768)
        t = torch.full((rows,), 500)
        with torch.no_grad():
            unet(x, t, context=ctx)  # warm-up
            times = []
            for _ in range(args.repeats):
                t1 = time.perf_counter()
                unet(x, t, context=ctx)
                times.append(time.perf_counter() - t1)
        print(json.dumps({"bench": "unet_step", "model": "sd15-random", "size": size, "unet_rows": rows,
                          "step_s_median": sorted(times)[len(times) // 2], "step_s_min": min(times),
                          "threads": torch.get_num_threads(), "build_s": round(build_s, 2),
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


if __name__ == "__main__":
    main()
