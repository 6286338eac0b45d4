"""ED-LoRA training speed and memory: `lib_mos.training.ConceptTrainer.train_step` on the tiny
model and on full-size SD1.5 or SDXL shapes with random weights.

    .venv/bin/python bench/training.py                                  # tiny + sd15, defaults
    .venv/bin/python bench/training.py --sizes sd15 --compare-checkpointing
    .venv/bin/python bench/training.py --device cuda --sizes sd15 --resolution 512 --batch-size 4
    .venv/bin/python bench/training.py --family sdxl --kind lora        # full-size SDXL (14 GB in fp32)
    .venv/bin/python bench/training.py --device cuda --family sdxl --resolution 1024 --batch-size 1

Each configuration runs in a fresh subprocess (`--worker`), so peak memory values do not mix. A
worker builds the model, writes 4 synthetic pictures to a temporary folder and reads them with
`training_data.read_training_folder`, times `trainer.prepare()` (augmentation + the preview
encoder, once per run: not part of a step), then runs `--warmup` steps and times `--steps` more;
steps/s is 1 / the median step time. Peak memory: `torch.cuda.max_memory_allocated` on CUDA
(reset after the model is on the device; "total" includes the weights), else the process peak RSS
(VmHWM from /proc/self/status, ru_maxrss where that is missing) and its increase over the RSS
just before the trainer was built. The script prints which one it used. Defaults on the CPU: 64 px
for tiny, 128 px batch 1 for sd15, 3 measured steps (about 2-3 minutes on 2 cores); on CUDA
512 px, batch 4, 10 steps. `--family sdxl` is the size "sdxl": 128 px batch 1 and one measured step
without warm-up on the CPU (an ED-LoRA step there takes many minutes: 70 copies of each caption go
through both encoders), 1024 px batch 1 on CUDA, gradient checkpointing on unless
`--no-gradient-checkpointing`. Each row also carries `family`, `stage` ("train_step"), `seconds`
(the median step) and `peak_rss_mb` (the process peak, or the CUDA peak on a GPU). A benchmark
reports, it never asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = ("tiny", "sd15", "sdxl")
FAMILY_SIZES = {"sd1": "sd15", "sdxl": "sdxl"}


def _status_mb(field: str) -> float | None:
    """VmHWM / VmRSS of this process in MB (None where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mb() -> tuple[float, str]:
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm, "VmHWM"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"


def _build(size: str, device: torch.device):
    from lib_mos.models import sd1

    if size == "sdxl":
        from lib_mos.models import sdxl
        from lib_mos.models.clip_tokenizer import load_clip_tokenizer

        with torch.random.fork_rng(devices=[]):
            unet, text = sdxl.build_unet(sdxl.SDXL_BASE), sdxl.build_text_encoders(sdxl.SDXL_BASE)
        gen = torch.Generator().manual_seed(0)
        sd1._randomise(unet, gen)
        sd1._randomise(text, gen)
        dtype = torch.float16 if device.type == "cuda" else torch.float32  # frozen weights, as the CLI loads them
        return sdxl.SDXLModel(unet.to(device, dtype).eval(), text.to(device, dtype).eval(), load_clip_tokenizer(),
                              sd1.sd1_alphas_cumprod(), sdxl.SDXL_BASE)
    if size == "tiny":
        model = sd1.build_tiny_sd1(0)
    else:
        from lib_mos.models.clip_tokenizer import load_clip_tokenizer

        with torch.random.fork_rng(devices=[]):
            unet, text = sd1.build_unet(sd1.SD15), sd1.build_text_encoder(sd1.SD15)
        gen = torch.Generator().manual_seed(0)
        sd1._randomise(unet, gen)  # N(0, 1/fan_in) weights, as the tiny model's
        sd1._randomise(text, gen)
        model = sd1.SD1Model(unet.float().eval(), text.float().eval(), load_clip_tokenizer(),
                             sd1.sd1_alphas_cumprod(), sd1.SD15)
    model.unet.to(device)
    model.text_encoder.to(device)
    return model


def _write_images(folder: Path, count: int, side: int) -> None:
    """`count` pictures of a coloured ellipse on a gradient, different per image."""
    from PIL import Image, ImageDraw

    for i in range(count):
        img = Image.linear_gradient("L").resize((side, side)).convert("RGB")
        draw = ImageDraw.Draw(img)
        m = side // (5 + i)
        draw.ellipse((m, m + i * 3, side - m, side - m // 2), fill=(40 * i + 60, 200 - 30 * i, 90))
        img.save(folder / f"img{i:02d}.png")


def _worker(cfg: dict) -> dict:
    from lib_mos.models.vae import PreviewEncoder
    from lib_mos.training.data import read_training_folder
    from lib_mos.training.trainer import ConceptTrainer, TrainSettings

    device = torch.device(cfg["device"])
    t0 = time.perf_counter()
    model = _build(cfg["size"], device)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        _write_images(Path(tmp), 4, max(cfg["resolution"], 128))
        images = read_training_folder(tmp, class_word="dog")
    kind = cfg.get("kind", "edlora")
    settings = TrainSettings(tokens=("<bench1>", "<bench2>") if kind == "edlora" else (), kind=kind,
                             trigger="ohwx dog" if kind == "lora" else None, class_word="dog", steps=1000,
                             batch_size=cfg["batch_size"], resolution=cfg["resolution"],
                             precision=cfg["precision"], gradient_checkpointing=cfg["gradient_checkpointing"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        model_mb = torch.cuda.memory_allocated(device) / 2**20
    else:
        model_mb = _status_mb("VmRSS") or 0.0

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    trainer = ConceptTrainer(model, settings, images, encoder=PreviewEncoder())
    times, losses = [], []
    with trainer.installed():
        t1 = time.perf_counter()
        trainer.prepare()
        sync()
        prepare_s = time.perf_counter() - t1
        for i in range(cfg["warmup"] + cfg["steps"]):
            t1 = time.perf_counter()
            loss, _ = trainer.train_step()
            sync()
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - t1)
                losses.append(loss)
    step_s = sorted(times)[len(times) // 2]
    if cuda:
        peak_mb, memory = torch.cuda.max_memory_allocated(device) / 2**20, "cuda.max_memory_allocated"
    else:
        peak_mb, memory = _peak_rss_mb()
    model_name = {"tiny": "tiny", "sd15": "sd15-random", "sdxl": "sdxl-random"}[cfg["size"]]
    return {"bench": "training", "family": model.family.name, "stage": "train_step", "kind": kind,
            "seconds": round(step_s, 3), "peak_rss_mb": round(peak_mb), "model": model_name,
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "resolution": cfg["resolution"], "batch_size": cfg["batch_size"], "precision": cfg["precision"],
            "autocast": str(trainer.autocast).replace("torch.", "") if trainer.autocast else "fp32",
            "gradient_checkpointing": cfg["gradient_checkpointing"], "steps_per_s": round(1 / step_s, 4),
            "step_s_median": round(step_s, 3), "step_s_min": round(min(times), 3), "measured_steps": len(times),
            "warmup_steps": cfg["warmup"], "prepare_s": round(prepare_s, 3), "views": len(trainer.views.image),
            "build_s": round(build_s, 2), "memory": memory, "peak_mb": round(peak_mb),
            "peak_over_model_mb": round(peak_mb - model_mb), "loss_last": round(losses[-1], 5),
            "threads": torch.get_num_threads()}


def _configs(args: argparse.Namespace) -> list[dict]:
    cuda = args.device.startswith("cuda")
    out = []
    for size in args.sizes:
        if size not in SIZES:
            raise SystemExit(f"--sizes: unknown size {size!r}; use {', '.join(SIZES)}")
        big_cpu = size != "tiny" and not cuda
        xl = size == "sdxl"
        base = {"size": size, "device": args.device, "precision": args.precision, "kind": args.kind,
                "warmup": args.warmup if args.warmup is not None else 0 if xl and not cuda else 1,
                "resolution": args.resolution or (1024 if cuda and xl else 512 if cuda else 64 if size == "tiny" else 128),
                "batch_size": args.batch_size or (1 if xl or big_cpu else 4),
                "steps": args.steps or (1 if xl and not cuda else 3 if not cuda else 10)}
        checkpointing = args.gradient_checkpointing if args.gradient_checkpointing is not None else xl
        modes = [False, True] if args.compare_checkpointing and size != "tiny" else [checkpointing]
        out += [dict(base, gradient_checkpointing=gc) for gc in modes]
    return out


def _table(rows: list[dict]) -> str:
    head = ("model", "res", "batch", "device", "autocast", "ckpt", "steps/s", "step s", "prepare s", "peak MB",
            "over model MB", "memory")
    lines = [" | ".join(head)]
    for r in rows:
        lines.append(" | ".join(str(x) for x in (
            r["model"], r["resolution"], r["batch_size"], r["device"], r["autocast"],
            "on" if r["gradient_checkpointing"] else "off", f"{r['steps_per_s']:.3g}", r["step_s_median"],
            r["prepare_s"], r["peak_mb"], r["peak_over_model_mb"], r["memory"])))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="tiny,sd15", help="comma-separated: tiny, sd15, sdxl")
    ap.add_argument("--family", choices=tuple(FAMILY_SIZES), default=None,
                    help="the full-size model of a family alone (sd1: sd15, sdxl: sdxl), instead of --sizes")
    ap.add_argument("--kind", choices=("edlora", "lora"), default="edlora",
                    help="lora: a kohya-style LoRA (each caption through the text encoders once)")
    ap.add_argument("--resolution", type=int, default=None,
                    help="pixels (default 64 tiny / 128 sd15 on CPU, 512 on CUDA)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 1 for sd15 on CPU, else 4")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 3 on CPU, 10 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1; SDXL on a CPU 0)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="default: on for SDXL, off otherwise")
    ap.add_argument("--compare-checkpointing", action="store_true",
                    help="run the full-size models twice, gradient checkpointing off and on")
    ap.add_argument("--json", action="store_true", help="one JSON line per configuration, no table")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))), flush=True)
        return
    args.sizes = [FAMILY_SIZES[args.family]] if args.family else [s.strip() for s in args.sizes.split(",") if s.strip()]
    rows = []
    for cfg in _configs(args):
        print(f"training bench: {json.dumps(cfg)}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], stdout=subprocess.PIPE,
                              text=True)
        if proc.returncode:
            print(json.dumps({"bench": "training", "config": cfg, "error": f"worker exit {proc.returncode}"}),
                  flush=True)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if rows and not args.json:
        print(_table(rows))
        print(f"memory: {rows[0]['memory']} (peak MB = process total incl. weights; over model = peak minus "
              "what was in use before the trainer was built); prepare = VAE/preview encode once, not timed per step")


if __name__ == "__main__":
    main()
