"""`python -m lib_mos train`: an ED-LoRA concept (or a kohya-style LoRA) from a folder of images.

A progress bar (loss, steps/s, ETA) on stderr; checkpoints every --save-every steps, written
atomically with the resume state beside them; --resume continues from the last one. The first
Ctrl-C (or SIGTERM) stops at the next step boundary, leaving the last complete checkpoint; a second
Ctrl-C ends at once, and still nothing is half-written (every file is written whole or not at all).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
from pathlib import Path

from lib_mos.cli_help import HelpWithDefaults

INTERRUPTED = 130  # the shell's code for a run ended by Ctrl-C


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lib_mos.training.trainer import TrainSettings

    d = TrainSettings()
    p = sub.add_parser("train", help="train an ED-LoRA concept (or a LoRA with trigger words) from a folder of images",
                       formatter_class=HelpWithDefaults)
    p.add_argument("--base", type=Path, required=True, metavar="MODEL.safetensors", help="SD1 or SDXL checkpoint to train on")
    p.add_argument("--images", type=Path, required=True, metavar="DIR",
                   help="images, with optional NAME.txt captions (<TOK> or the class word marks the concept) and "
                        "NAME_mask.png subject masks")
    p.add_argument("--out", type=Path, required=True, metavar="CONCEPT.safetensors")
    p.add_argument("--tokens", default=None, metavar="'<name1>+<name2>'", help="concept tokens (default from --out)")
    p.add_argument("--class-word", default=None, help="e.g. man, dog: initialises the last token; in captions it "
                                                      "stands for the concept")
    p.add_argument("--kind", choices=("edlora", "lora"), default="edlora")
    p.add_argument("--trigger", default=None, help="trigger words of a --kind lora")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--resolution", type=int, default=d.resolution)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--lr-embedding", type=float, default=d.lr_embedding)
    p.add_argument("--lr-text", type=float, default=d.lr_text)
    p.add_argument("--lr-unet", type=float, default=d.lr_unet)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--norm-stop", type=float, default=d.norm_stop, help="rows stop at this mean norm (0: never)")
    p.add_argument("--no-masked-loss", action="store_true", help="ignore subject masks in the loss")
    p.add_argument("--attn-reg", type=float, default=d.attn_reg_weight,
                   help="attention regulariser weight (the authors use 0.01 with masks)")
    p.add_argument("--noise-offset", type=float, default=d.noise_offset)
    p.add_argument("--templates", default=d.templates, help="caption templates: human, object, style or none")
    p.add_argument("--no-shuffle-captions", action="store_true")
    p.add_argument("--crop-p", type=float, default=d.crop_p)
    p.add_argument("--flip-p", type=float, default=d.flip_p)
    p.add_argument("--views-per-image", type=int, default=d.views_per_image,
                   help="augmented views per image, encoded once")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="autocast dtype; trained parameters stay fp32 (auto: fp16 on CUDA, else fp32)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="less memory, about a third slower (default: on for SDXL, whose 1024 px sample needs "
                        "about 36 GB without it, off for SD1)")
    p.add_argument("--vae", type=Path, default=None, help="a VAE file to use instead of the checkpoint's")
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="checkpoint every N steps")
    p.add_argument("--sample-every", type=int, default=0, metavar="N", help="preview images every N steps")
    p.add_argument("--sample-prompt", action="append", default=[], help="preview prompt with <TOK>; repeatable")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint of --out")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _tokens(text: str | None, out: Path) -> tuple[str, ...]:
    if text is None:
        stem = "".join(ch for ch in out.stem if ch.isalnum() or ch in "_-") or "concept"
        return (f"<{stem}1>", f"<{stem}2>")
    return tuple(t.strip() for t in text.split("+"))


class _StopFlag:
    """First signal: stop at the next step boundary; a second Ctrl-C: KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.set = False

    def __call__(self, signum, frame) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True
        print("\nstopping after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from lib_mos.cli.main import ProgressBar, _fail
    from lib_mos.concepts.concept import ConceptError
    from lib_mos.models import checkpoints, vae
    from lib_mos.training.data import read_training_folder
    from lib_mos.training.trainer import TrainingInterrupted, TrainSettings, train

    stop = _StopFlag()
    bar = ProgressBar()
    try:
        settings = TrainSettings(
            tokens=_tokens(args.tokens, args.out) if args.kind == "edlora" else (), class_word=args.class_word,
            kind=args.kind, trigger=args.trigger, rank=args.rank, lr_embedding=args.lr_embedding,
            lr_text=args.lr_text, lr_unet=args.lr_unet, weight_decay=args.weight_decay, steps=args.steps,
            batch_size=args.batch_size, grad_accum=args.grad_accum, resolution=args.resolution, seed=args.seed,
            norm_stop=args.norm_stop, masked_loss=not args.no_masked_loss, attn_reg_weight=args.attn_reg,
            noise_offset=args.noise_offset, templates=args.templates, shuffle_captions=not args.no_shuffle_captions,
            crop_p=args.crop_p, flip_p=args.flip_p, views_per_image=args.views_per_image, precision=args.precision,
            gradient_checkpointing=bool(args.gradient_checkpointing), save_every=args.save_every,
            sample_every=args.sample_every if args.sample_prompt else 0, sample_prompts=tuple(args.sample_prompt),
            sample_steps=args.sample_steps)
        if args.out.exists() and not (args.overwrite or args.resume):
            raise ValueError(f"{args.out}: already exists (pass --overwrite to replace it, or --resume)")
        images = read_training_folder(args.images, class_word=settings.class_word)
        device = torch.device(args.device)
        dtype = torch.float32  # frozen weights in half precision on a GPU; the trained parameters stay fp32
        if device.type == "cuda" and settings.precision in ("auto", "fp16", "bf16"):
            dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float16
        model = checkpoints.load_checkpoint(args.base, device=device, dtype=dtype)
        if args.gradient_checkpointing is None and model.family.name == "sdxl":
            settings = dataclasses.replace(settings, gradient_checkpointing=True)
        encoder, decoder, codec = vae.image_codec(args.base, device=device, vae=args.vae,
                                                  scale=model.family.latent_scale)
        if isinstance(encoder, vae.PreviewEncoder) and model.config.model_channels >= 320:
            raise ValueError(f"{args.base}: has no VAE (first_stage_model.*), and a full-size model cannot learn from "
                             "the linear stand-in used for tests; pass --vae FILE")
        print(f"{args.base}: {model.family.label}, {codec}; {len(images)} images from {args.images}; gradient "
              f"checkpointing {'on' if settings.gradient_checkpointing else 'off'}", flush=True)
        samples = args.out.with_name(args.out.stem + "-samples")

        def vae_off() -> None:
            vae_module = getattr(encoder, "vae", None)
            if vae_module is not None and device.type != "cpu":
                vae_module.to("cpu")  # previews then decode on the CPU; the GPU keeps what trains

        def progress(p) -> None:
            norm = f", norm {p.emb_norm:.3f}" if p.emb_norm is not None else ""
            bar(f"train: steps: loss {p.loss:.4f}{norm}", p.step, p.steps)

        def on_samples(step: int, pictures) -> None:
            samples.mkdir(parents=True, exist_ok=True)
            for k, picture in enumerate(pictures):
                picture.save(samples / f"step{step:06d}-{k}.png")

        def on_checkpoint(step: int, path: Path) -> None:
            bar.close()
            print(f"checkpoint at step {step}: {path}", flush=True)

        previous = [signal.signal(signal.SIGINT, stop)]
        if hasattr(signal, "SIGTERM"):
            previous.append(signal.signal(signal.SIGTERM, stop))
        t0 = time.perf_counter()
        try:
            concept = train(model, settings, images, args.out, encoder=encoder, decoder=decoder, name=args.out.stem,
                            resume=args.resume, overwrite=args.overwrite, progress=progress,
                            should_stop=lambda: stop.set, on_samples=on_samples, on_checkpoint=on_checkpoint,
                            on_encoded=vae_off)
        finally:
            signal.signal(signal.SIGINT, previous[0])
            if len(previous) > 1:
                signal.signal(signal.SIGTERM, previous[1])
    except TrainingInterrupted as exc:
        bar.close()
        hint = " (continue with --resume)" if exc.checkpoint else ""
        print(f"{args.out}: {exc}{hint}", file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:
        bar.close()
        print(f"{args.out}: stopped at once; files written before are whole", file=sys.stderr)
        return INTERRUPTED
    except (ConceptError, ValueError, OSError) as exc:
        bar.close()
        return _fail(str(exc))
    bar.close()
    words = " ".join(concept.tokens) if concept.tokens else ", ".join(concept.triggers)
    print(f"wrote {args.out}: concept {concept.name!r} ({words}), {settings.steps} steps in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0
