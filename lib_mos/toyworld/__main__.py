"""`python -m lib_mos.toyworld COMMAND`: build the toy world's weights (see docs/toyworld.md).

    train-probes  --out DIR              the attribute and concept probes (minutes), with held-out accuracy
    train-base    --out RUN [--steps N]  the base model; run it again to resume; RUN/base.safetensors at the end
    curve         --run RUN --probes DIR the learning curve: probe scores of every EMA snapshot, JSON lines
    tune-concepts --weights DIR          the novel concepts with the ED-LoRA trainer, and their identity alone
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

from lib_mos.cli_help import HelpWithDefaults
from lib_mos.toyworld import base, measure, novel, probe, weights
from lib_mos.toyworld.codec import PatchCodec


def _codec(folder: Path) -> PatchCodec:
    path = folder / weights.CODEC
    if path.exists():
        return PatchCodec.load(path)
    codec = PatchCodec.fit()
    folder.mkdir(parents=True, exist_ok=True)
    codec.save(path)
    return codec


def _train_probes(args: argparse.Namespace) -> int:
    codec = _codec(args.out)
    jobs = (("attributes", weights.ATTRIBUTE_PROBE, probe.ATTRIBUTE_HEADS, probe.attribute_batch, 0),
            ("concepts", weights.CONCEPT_PROBE, {"concept": len(probe.concept_classes())}, probe.concept_batch, 1))
    for name, file, heads, make, seed in jobs:
        t0 = time.perf_counter()
        p = probe.train_probe(heads, make, codec, steps=args.steps, seed=seed, log=lambda m: None)
        info = {"augmented": probe.held_out_accuracy(p, make, codec),
                "clean": probe.held_out_accuracy(p, make, codec, augmented=False),
                "steps": args.steps, "seconds": round(time.perf_counter() - t0, 1)}
        p.save(args.out / file, info)
        print(json.dumps({"probe": name, **info}), flush=True)
    return 0


def _train_base(args: argparse.Namespace) -> int:
    stop = {"now": False}

    def on_signal(signum, frame) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    args.out.mkdir(parents=True, exist_ok=True)
    _codec(args.out)
    settings = base.BaseSettings(steps=args.steps, lr=args.lr, warmup=args.warmup, wide_fraction=args.wide_fraction,
                                 single_only_fraction=args.single_only_fraction, init=str(args.init or ""))
    final = base.train_base(args.out, settings,
                            log=lambda m: print(m, flush=True), should_stop=lambda: stop["now"])
    return 0 if final else 130


def _curve(args: argparse.Namespace) -> int:
    codec = PatchCodec.load(args.run / weights.CODEC)
    attributes, _ = probe.Probe.load(args.probes / weights.ATTRIBUTE_PROBE)
    for snap in sorted((args.run / "snapshots").glob("ema-*.safetensors")):
        step = int(snap.stem.split("-")[1])
        model = base.load_base(snap)
        scores = measure.base_accuracy(model, codec, attributes, seeds_per_caption=args.seeds)
        for cells in args.placement_cells if args.placement_seeds else ():  # plain prompts in regions: the ceiling
            for g in args.global_weights:
                placed, _ = measure.prompt_placement(model, codec, attributes, cells, seeds=args.placement_seeds,
                                                     layout=measure.Layout(global_weight=g))
                scores[f"placement_{cells}" + (f"_global_{g:g}" if g else "")] = placed["placement"]
        print(json.dumps({"step": step, **{k: round(v, 4) for k, v in scores.items()}}), flush=True)
    return 0


def _tune(args: argparse.Namespace) -> int:
    folder = args.weights
    model = base.load_base(folder / weights.BASE)
    codec = PatchCodec.load(folder / weights.CODEC)
    concept_probe, _ = probe.Probe.load(folder / weights.CONCEPT_PROBE)
    for label, concept in enumerate(novel.NOVEL):
        if args.only and concept.style not in args.only:
            continue
        t0 = time.perf_counter()
        out = weights.concept_path(args.out or folder, concept.style)
        out.parent.mkdir(parents=True, exist_ok=True)
        trained = novel.tune(model, codec, concept, out, steps=args.steps, recipe_name=args.recipe)
        seconds = time.perf_counter() - t0
        parts = measure.identity_parts(model, codec, concept_probe, trained, label, seeds=args.seeds)
        print(json.dumps({"concept": concept.style, "recipe": args.recipe, "tokens": list(concept.tokens),
                          "steps": novel.recipe(concept, args.recipe, args.steps)["steps"],
                          "seconds": round(seconds, 1), "identity_alone": parts["all"],
                          "identity_parts": parts}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_mos.toyworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train-probes", formatter_class=HelpWithDefaults)
    p.add_argument("--out", type=Path, default=weights.WEIGHTS)
    p.add_argument("--steps", type=int, default=1000)
    p = sub.add_parser("train-base", formatter_class=HelpWithDefaults)
    p.add_argument("--out", type=Path, required=True, help="run folder (state, log, snapshots)")
    p.add_argument("--steps", type=int, default=base.BaseSettings.steps)
    p.add_argument("--init", type=Path, help="start from this base checkpoint (fine-tune it)")
    p.add_argument("--lr", type=float, default=base.BaseSettings.lr)
    p.add_argument("--warmup", type=int, default=base.BaseSettings.warmup)
    p.add_argument("--wide-fraction", type=float, default=base.BaseSettings.wide_fraction,
                   help="share of steps on 64x32 / 96x32 canvases, one object per 32-px cell")
    p.add_argument("--single-only-fraction", type=float, default=base.BaseSettings.single_only_fraction,
                   help="the first part of the run shows one object only")
    p = sub.add_parser("curve", formatter_class=HelpWithDefaults)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--probes", type=Path, default=weights.WEIGHTS)
    p.add_argument("--seeds", type=int, default=2, help="samples per caption (48 captions)")
    p.add_argument("--placement-seeds", type=int, default=32,
                   help="pictures of plain prompts in side-by-side regions per snapshot (0: skip)")
    p.add_argument("--placement-cells", type=int, nargs="+", default=[2], help="regions side by side")
    p.add_argument("--global-weights", type=float, nargs="+", default=[0.0],
                   help="the share of the global prompt kept inside each region")
    p = sub.add_parser("tune-concepts", formatter_class=HelpWithDefaults)
    p.add_argument("--weights", type=Path, default=weights.WEIGHTS)
    p.add_argument("--steps", type=int, help="training steps (default: the concept's recipe, novel.RECIPES)")
    p.add_argument("--recipe", choices=sorted(novel.RECIPES), default="product",
                   help="product: rates scaled to the toy model; authors: their rates, masks and regulariser")
    p.add_argument("--out", type=Path, help="where the concepts go (default: the weights folder's concepts/)")
    p.add_argument("--seeds", type=int, default=32)
    p.add_argument("--only", nargs="*", help="styles to tune (default: all)")
    p = sub.add_parser("publish", help="copy a finished run's base, codec and log into the weights folder",
                       formatter_class=HelpWithDefaults)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--to", type=Path, default=weights.WEIGHTS)
    p.add_argument("--log-as", default="base-train-log.jsonl", help="the training log's name in the weights folder")
    args = parser.parse_args(argv)
    if args.command == "train-probes":
        return _train_probes(args)
    if args.command == "train-base":
        return _train_base(args)
    if args.command == "curve":
        return _curve(args)
    if args.command == "tune-concepts":
        return _tune(args)
    if args.command == "publish":
        args.to.mkdir(parents=True, exist_ok=True)
        for name in (weights.BASE, weights.CODEC, base.LOG):
            shutil.copy2(args.run / name, args.to / (name if name != base.LOG else args.log_as))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
