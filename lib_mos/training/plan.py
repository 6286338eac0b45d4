"""What the training tab proposes before Train is pressed: steps, batch size and resolution that
suit the device, an estimate of how long they take, and the caption templates a class word calls for.

Pure functions of plain values (device kind, memory in bytes, thread count, model family), so they
are tested without a device and the host glue only reads `modules.devices.device`,
`torch.cuda.get_device_properties(...).total_memory` (the RAM on a CPU) and the thread count.

Why a proposal at all: the authors' recipe (1000 steps, batch 4, 512 px) is minutes on a GPU but
most of a day on a 2-core CPU (and about 30 GB of RAM). On a CPU the proposal is a run that ends
within about an hour (`CPU_BUDGET_S`), at the best resolution that leaves enough steps; on a GPU it
is the authors' recipe, with the batch cut to what its memory holds.

Basis of the estimate (per step: `overhead + batch * per_sample * shape(resolution)`):
- CPU, measured on the machine this was written on: CPU seconds (`time.process_time`, one torch
  thread, so other jobs sharing the cores do not count) of `ConceptTrainer.train_step` with the
  tab's defaults (ED-LoRA, two tokens, rank 4, text and UNet LoRA, fp32) on SD1.5's shapes with
  random weights (bench/training.py's `_build("sd15")`), batch 1, 1-2 steps after a warm-up step:
  6.8 s at 128 px, 9.9 s at 256 px, 30.4 s at 512 px (peak RSS 11.4 GB there, weights included).
  `CPU_MEASUREMENTS` holds them; `per_sample` and `overhead` are their least-squares line (within
  8 % of each). The fixed part is large on a CPU: small convolutions run far below the machine's
  peak. The tiny test model steps in 0.47 s at 64 px, batch 4 (0.7 s at 128 px) there: its UNet is
  not SD1.5's shape, so it is no stand-in. docs/performance.md's 3.5 s wall per step at 128 px on two
  idle cores agrees (6.8 s / 2**0.8 = 3.9 s): more threads are taken to help as
  `threads ** THREAD_EXPONENT`, a cautious figure (big CPUs are bound by memory bandwidth).
- `shape(resolution)`: the fraction of a 512 px sample's work at another size, from SD1.5's FLOPs
  (`torch.utils.flop_counter` on meta tensors): the UNet's forward is 46 / 180 / 803 GFLOPs at
  128 / 256 / 512 px, its attention products 126 of the 803 (quadratic in the pixels, the rest
  linear); the text encoder's 13 GFLOPs do not depend on the size.
- SDXL (`family="sdxl"`), computed relative to SD1.5 (no SDXL step was timed): a sample costs the
  UNet's forward FLOPs (1589 / 3641 / 6761 GFLOPs at 512 / 768 / 1024 px, `torch.utils.flop_counter`
  on the meta skeleton; fitted as `6221 q + 540 q^2` GFLOPs, q the pixels over 1024^2) plus the
  text encoders', once per layer copy of a caption with concept tokens: 70 x (CLIP-L 13 + bigG 101)
  = 7980 GFLOPs, against SD1.5's 803 + 16 x 13 = 1011. At 1024 px an SDXL ED-LoRA sample is 14.6
  SD1.5 samples at 512 px, more than half of it the 70 text copies. Its GPU batch is what the
  memory holds besides the model in fp16 (UNet 5.1 GB, encoders 1.6 GB, VAE 0.17 GB: 5.5 GB with
  rounding up); its default is 1024 px on a GPU, 512 px elsewhere.
- CUDA, assumed (no GPU was lent for this work): 0.2 s per 512 px sample in fp16 autocast, from the
  authors' 5-10 minutes for 1000 steps of batch 2 per GPU on two A100s. MPS and other accelerators:
  1.5 s per sample, a cautious guess. The progress bar's ETA is the exact figure once a run starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "AUTHORS",
    "CPU_BUDGET_S",
    "Plan",
    "estimate_seconds",
    "format_duration",
    "propose",
    "templates_for_class_word",
]

GIB = 2**30
CPU_BUDGET_S = 3600.0  # a proposed CPU run should end within about an hour
MIN_STEPS, MAX_STEPS = 100, 1000
GOOD_STEPS = 500  # a CPU gets a higher resolution only where at least this many steps fit the budget
# CPU resolutions, best first, with the RAM (GiB) each needs: SD1.5 in fp32 (4.3 GB) and its
# training activations at batch 1 (measured peak 11.4 GB at 512 px; 256 px needs far less)
CPU_RESOLUTIONS: tuple[tuple[int, float], ...] = ((512, 24.0), (384, 16.0), (256, 0.0))


@dataclass(frozen=True)
class Plan:
    """A proposal: the three settings and the estimated seconds of their steps."""

    steps: int
    batch_size: int
    resolution: int
    seconds: float
    gradient_checkpointing: bool = False  # SDXL: without it a 1024 px sample needs about 36 GB


AUTHORS = Plan(steps=1000, batch_size=4, resolution=512, seconds=math.nan)  # the paper's recipe

# ------------------------------------------------------------------------------------ the costs

TEXT_SHARE = 0.016  # the text encoder (77 tokens: 13 GFLOPs forward) in a 512 px SD1.5 sample
ATTENTION_SHARE = 0.157  # attention (quadratic in the pixels): 126 of the UNet's 803 GFLOPs at 512 px
THREAD_EXPONENT = 0.8  # CPU: doubling the threads is taken as 2**0.8 = 1.74x faster
CPU_MEASURED_THREADS = 1

# (resolution, batch, CPU seconds per step on one thread) of SD1.5 shapes (see the module docstring)
CPU_MEASUREMENTS: tuple[tuple[int, int, float], ...] = ((128, 1, 6.8), (256, 1, 9.9), (512, 1, 30.4))


@dataclass(frozen=True)
class _Speed:
    per_sample_512: float  # seconds of one 512 px SD1.5 sample (forward and backward)
    overhead: float  # seconds per step besides the samples (optimizer, LoRA hooks, scheduling)


def shape(resolution: int) -> float:
    """A sample's work at `resolution` as a fraction of a 512 px sample's (1.0 at 512)."""
    p = (resolution / 512) ** 2
    unet = (1 - ATTENTION_SHARE) * p + ATTENTION_SHARE * p * p
    return TEXT_SHARE + (1 - TEXT_SHARE) * unet


def _cpu_speed() -> _Speed:
    """Least squares of `seconds = overhead + batch * per_sample * shape(res)` over the measurements;
    a negative overhead is clipped to 0."""
    xs = [b * shape(r) for r, b, _ in CPU_MEASUREMENTS]
    ys = [s for _, _, s in CPU_MEASUREMENTS]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if n > 1 and sxx else my / mx
    overhead = max(0.0, my - slope * mx)
    return _Speed(per_sample_512=slope, overhead=overhead)


SPEEDS: dict[str, _Speed] = {
    "cpu": _cpu_speed(),
    "cuda": _Speed(per_sample_512=0.2, overhead=0.05),
    "mps": _Speed(per_sample_512=1.5, overhead=0.1),
}
# SDXL ED-LoRA training memory in GiB, computed (no GPU was lent): frozen weights in fp16 (UNet 5.1,
# CLIP-L 0.25, bigG 1.4, VAE 0.17; the tab's transformers bigG is views of the host's) and, per sample,
# activations kept for
# the backward pass in fp16 autocast, taken as half the fp32 bytes that torch's saved-tensor hooks
# count on the meta skeleton with the project's attention (explicit softmax: an upper bound where
# the host uses SDPA or xformers). (resolution, checkpointing) -> (UNet, 70 text copies) a sample.
SDXL_WEIGHTS_GIB = 6.9  # the weights above, rounded up by 1.4 GB of headroom (allocator, host buffers)
SDXL_MEMORY_GIB: dict[tuple[int, bool], tuple[float, float]] = {
    (512, False): (6.0, 9.4), (768, False): (10.2, 9.4), (1024, False): (19.8, 9.4),
    (512, True): (0.9, 0.3), (768, True): (1.3, 0.3), (1024, True): (2.1, 0.3),
}
FAMILIES = ("sd1", "sdxl")  # what the trainer trains; a family is added with its cost relative to SD1.5
SD15_SAMPLE_GFLOPS = 803.0 + 16 * 13.0  # SD1.5's UNet at 512 px and its 16 text copies
SDXL_TEXT_GFLOPS = 70 * (13.0 + 101.0)  # 70 layer copies of CLIP-L and bigG (77 tokens each)


def _speed(device_kind: str, threads: int | None) -> _Speed:
    kind = (device_kind or "cpu").split(":")[0].lower()
    if kind == "cpu":
        base = SPEEDS["cpu"]
        factor = (CPU_MEASURED_THREADS / max(1, threads or CPU_MEASURED_THREADS)) ** THREAD_EXPONENT
        return _Speed(base.per_sample_512 * factor, base.overhead * factor)
    return SPEEDS.get(kind, SPEEDS["mps"])  # xpu, npu, ...: the cautious accelerator figures


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"model family {family!r}: Mix-of-Show trains {', '.join(FAMILIES)} models only")


def sample_cost(resolution: int, family: str = "sd1") -> float:
    """A sample's work in 512 px SD1.5 samples (`shape`; SDXL from FLOPs, see the module docstring)."""
    _check_family(family)
    if family == "sd1":
        return shape(resolution)
    q = (resolution / 1024) ** 2
    return (6221.0 * q + 540.0 * q * q + SDXL_TEXT_GFLOPS) / SD15_SAMPLE_GFLOPS


def estimate_seconds(steps: int, batch_size: int, resolution: int, device_kind: str, *, threads: int | None = None,
                     family: str = "sd1") -> float:
    """Seconds the steps take (the one-off image encoding and preview samples not included)."""
    _check_family(family)
    if steps < 0 or batch_size < 1 or resolution < 8:
        raise ValueError(f"steps {steps}, batch {batch_size}, resolution {resolution}: out of range")
    speed = _speed(device_kind, threads)
    return steps * (speed.overhead + batch_size * speed.per_sample_512 * sample_cost(resolution, family))


def _gpu_batch(memory_bytes: int | None, family: str = "sd1") -> tuple[int, int]:
    """(batch, resolution) that a CUDA device's memory holds with the whole model on it in fp16:
    SD1.5 (about 2.5 GiB with the VAE) and its activations at 512 px (about 2 GiB a sample);
    SDXL with gradient checkpointing (`SDXL_MEMORY_GIB`) at 1024 px: one sample from 11 GiB, two
    from 16, four from 24, one at 768 px from 9 (below that, 512 px, which the tab's 8.1 GiB may
    not fit)."""
    if family == "sdxl":  # with gradient checkpointing: see SDXL_MEMORY_GIB
        gib = (memory_bytes or 0) / GIB
        if memory_bytes is None or 11 <= gib < 16:
            return 1, 1024
        return (4, 1024) if gib >= 24 else (2, 1024) if gib >= 16 else (1, 768) if gib >= 9 else (1, 512)
    if memory_bytes is None:
        return 1, 512
    gib = memory_bytes / GIB
    if gib >= 15:
        return 4, 512
    if gib >= 9:
        return 2, 512
    if gib >= 5.5:
        return 1, 512
    return 1, 384


def _steps_in_budget(resolution: int, kind: str, threads: int | None, family: str) -> int:
    """Steps of batch 1 that fit `CPU_BUDGET_S`, in tens, at most `MAX_STEPS` (may be under `MIN_STEPS`)."""
    per_step = estimate_seconds(1, 1, resolution, kind, threads=threads, family=family)
    return int(min(MAX_STEPS, CPU_BUDGET_S / per_step // 10 * 10))


def propose(device_kind: str, memory_bytes: int | None = None, family: str = "sd1", *,
            threads: int | None = None) -> Plan:
    """The settings to start from on this device (`memory_bytes`: a GPU's memory, or a CPU's RAM).
    CUDA: the authors' 1000 steps at 512 px (SD1), the batch its memory holds. CPU: batch 1 at the best
    resolution where `GOOD_STEPS` fit `CPU_BUDGET_S` and the RAM suffices (unknown RAM: 256 px
    only), else 256 px (a quarter of the pixels; SD1.5 still draws a subject there), with the steps
    that fit the budget (100 to 1000, in tens). Other accelerators (MPS, ...): batch 1 at 512 px,
    steps to the same budget. SDXL: on CUDA 1024 px (`_gpu_batch`), elsewhere 512 px, batch 1,
    steps to the budget, always with gradient checkpointing."""
    _check_family(family)
    kind = (device_kind or "cpu").split(":")[0].lower()
    batch = 1
    if kind == "cuda":
        batch, resolution = _gpu_batch(memory_bytes, family)
        steps = AUTHORS.steps
    elif family == "sdxl":  # below 512 px SDXL draws poorly; on a CPU its steps are hours anyway
        resolution = 512
        steps = max(MIN_STEPS, _steps_in_budget(resolution, kind, threads, family))
    elif kind == "cpu":
        ram = memory_bytes / GIB if memory_bytes else 0.0
        fitting = [r for r, need in CPU_RESOLUTIONS
                   if ram >= need and _steps_in_budget(r, kind, threads, family) >= GOOD_STEPS]
        resolution = fitting[0] if fitting else CPU_RESOLUTIONS[-1][0]
        steps = max(MIN_STEPS, _steps_in_budget(resolution, kind, threads, family))
    else:
        resolution = 512
        steps = max(MIN_STEPS, _steps_in_budget(resolution, kind, threads, family))
    return Plan(steps=steps, batch_size=batch, resolution=resolution,
                seconds=estimate_seconds(steps, batch, resolution, kind, threads=threads, family=family),
                gradient_checkpointing=family == "sdxl")


def format_duration(seconds: float) -> str:
    """'about 40 s', 'about 12 min', 'about 3.5 h', 'about 2.3 days': a reader's precision."""
    if not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min"
    if seconds < 36 * 3600:
        return f"about {seconds / 3600:.1f} h"
    return f"about {seconds / 86400:.1f} days"


# ------------------------------------------------------------------------------- caption templates

# class words whose pictures are people: the "human" templates (portrait, headshot, selfie, ...)
HUMAN_WORDS = frozenset((
    "person", "man", "woman", "boy", "girl", "child", "kid", "baby", "guy", "lady", "gentleman", "people", "human",
    "character", "actor", "actress", "player", "singer", "soldier", "knight", "warrior", "teenager", "student"))
STYLE_WORDS = frozenset(("style", "artstyle", "painting", "illustration", "drawing", "artwork", "art"))


def templates_for_class_word(class_word: str | None) -> str:
    """The caption templates (a key of `training.data.TEMPLATES`) that suit the class word: people
    get portraits ("human"), a style word ("style", "painting") the style captions, anything else
    (dog, cat, car, ...) and no class word the generic photo captions, "object"."""
    words = (class_word or "").lower().split()
    if not words:
        return "object"
    last = words[-1].strip(".,")
    if last in HUMAN_WORDS or last.rstrip("s") in HUMAN_WORDS or last in ("men", "women", "children"):
        return "human"
    if last in STYLE_WORDS:
        return "style"
    return "object"
