"""Benchmark: can a fused checkpoint be trusted? The unregularised least-squares fit the project
used before ("old": no ridge to speak of, prior = the base, one spatial seed, no validation, no
trust region) against today's solve ("new": the defaults), on two random concepts.

    .venv/bin/python bench/fusion_trust.py --model sd15 --steps 1 --size 256
    .venv/bin/python bench/fusion_trust.py --model tiny --steps 2 --size 64 --seeds 1 4

For each solve it prints, per fused layer set: the largest fused weight against the base's largest
(max|W| / max|W0|), the fused change against all concepts' changes together
(||W - W0||_F / sum_i ||dW_i||_F: worst layer, and how many layers exceed 1), the fusion report
with its held-out errors and flags, its warnings, and how far a plain prompt's image moves from
the base model's (mean and max absolute pixel levels; with `--images`), next to how far applying
both concepts' LoRAs moves it. `sd15` is the random full-size SD1.5 of the real-host suite (read
from its cache, written there when missing); on a 2-core CPU a new solve at 1 step and 256 px takes
about 5 minutes. A benchmark reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib_mos.concepts import synthetic  # noqa: E402
from lib_mos.concepts.binding import PromptBinder  # noqa: E402
from lib_mos.concepts.concept import applied  # noqa: E402
from lib_mos.fusion import pipeline as fusion  # noqa: E402
from lib_mos.fusion import report as fusion_report  # noqa: E402
from lib_mos.models import sampling, sd1  # noqa: E402

OLD = {"ridge": 1e-8, "prior": "base", "spatial_seeds": 1, "validate": False, "max_change": None}
PROMPT = "a photo of a dog on the grass"


def load_model(which: str) -> sd1.SD1Model:
    if which == "tiny":
        return sd1.build_tiny_sd1(0)
    sys.path.insert(0, str(ROOT / "tests" / "realhost"))
    from sd15_checkpoint import write_random_sd15

    path = Path.home() / ".cache" / "lib_mos" / "realhost" / "sd15-random-seed0.safetensors"
    if not path.exists():
        write_random_sd15(path, seed=0)
    return sd1.load_checkpoint(path)


def plain_image(model: sd1.SD1Model, size: int, weights: fusion.FusionResult | None = None,
                loras: list | None = None) -> np.ndarray:
    """One seeded 8-step image of PROMPT: with fused weights swapped in, or with LoRAs applied."""
    with torch.no_grad(), fusion._weights(model.text_encoder, weights.text_weights if weights else {}), \
            fusion._weights(model.unet, weights.unet_weights if weights else {}), \
            applied(loras or [], model.unet, model.text_encoder):
        binder = PromptBinder(model, [])
        latents = sampling.sample_euler(model, binder.encode([PROMPT]), binder.encode([""]), seeds=[7],
                                        height=size, width=size, steps=8, cfg_scale=7.5)
    return np.asarray(sampling.latents_to_images(latents)[0]).astype(np.float64)


def layer_moves(model: sd1.SD1Model, inputs: list[fusion.FusionInput], result: fusion.FusionResult) -> dict:
    peak, change, over = (0.0, ""), (0.0, ""), 0
    for name, w in {**result.text_weights, **result.unet_weights}.items():
        text = name in result.text_weights
        w0 = (model.text_encoder if text else model.unet).get_submodule(name).weight.detach().float()
        deltas = [(i.concept.text_lora if text else i.concept.unet_lora)[name].delta(torch.float32) for i in inputs]
        moved = float((w - w0).norm() / sum(d.norm() for d in deltas))
        over += moved > 1
        change = max(change, (moved, name))
        peak = max(peak, (float(w.abs().max() / w0.abs().max()), name))
    return {"peak": peak, "change": change, "over": over, "layers": len(result.text_weights) + len(result.unet_weights)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--steps", type=int, default=1, help="spatial sampling steps")
    ap.add_argument("--size", type=int, default=256, help="spatial sampling size (px)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[4], help="spatial seeds of the new solve (one run each)")
    ap.add_argument("--solves", nargs="+", choices=["old", "new"], default=["old", "new"])
    ap.add_argument("--images", action="store_true", help="also measure how far a plain prompt's image moves")
    args = ap.parse_args()

    model = load_model(args.model)
    inputs = [fusion.FusionInput(synthetic.random_concept(model, (f"<c{k}a>", f"<c{k}b>"), seed=k + 1, name=f"c{k}"))
              for k in range(2)]
    image_size = 256 if args.model == "sd15" else 64
    base_image = plain_image(model, image_size) if args.images else None
    if args.images:
        moved = np.abs(plain_image(model, image_size, loras=[(i.concept, 1.0, 1.0) for i in inputs]) - base_image)
        print(f"# {args.model}: both LoRAs applied move the plain image by mean {moved.mean():.1f}, max {moved.max():.0f}")
    runs = [("old", OLD)] if "old" in args.solves else []
    runs += [(f"new, {s} seed(s)", {"spatial_seeds": s}) for s in args.seeds] if "new" in args.solves else []
    for label, overrides in runs:
        settings = dataclasses.replace(fusion.FusionSettings(spatial_steps=args.steps, spatial_size=args.size),
                                       **overrides)
        t0 = time.perf_counter()
        result = fusion.fuse(model, inputs, settings)
        seconds = time.perf_counter() - t0
        m = layer_moves(model, inputs, result)
        line = (f"{label} ({args.steps} step(s), {args.size} px): {seconds:.0f} s; max|W|/max|W0| {m['peak'][0]:.1f} "
                f"({m['peak'][1]}); change / sum||dW|| worst {m['change'][0]:.2f} ({m['change'][1]}), over 1 in "
                f"{m['over']}/{m['layers']} layers")
        if args.images:
            moved = np.abs(plain_image(model, image_size, weights=result) - base_image)
            line += f"; plain image moves mean {moved.mean():.1f}, max {moved.max():.0f}"
        print(line)
        print(fusion_report.format_report(result.report, result.warnings), flush=True)


if __name__ == "__main__":
    main()
