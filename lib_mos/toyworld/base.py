"""Train the toy world's base text-to-image model: SD1 topology, tiny widths, learned from scratch.

The model is the product's own SD1 build (ldm UNetModel with the 16 attn2 layers in SD1 order, a
CLIPTextModel with the real BPE tokenizer), so binding, regions, fusion and the ED-LoRA trainer
run on it unchanged. It learns eps-prediction on SD1's discrete schedule over the patch codec's
16x16x4 latents, which is what the product's Euler sampler expects.

Choices made so that caption binding is learned within a CPU budget: a 48-word-combination world
with short captions; single-object captions only for the first part of the run (curriculum);
AdamW at a high learning rate with warm-up and cosine decay; min-SNR loss weighting; an EMA of
the weights (what is saved); 10% empty captions for classifier-free guidance.

Resumable and exact: every batch is a pure function of (seed, step), and the state file holds
the weights, the EMA and the optimiser moments. Snapshots of the EMA are kept for the learning
curve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from lib_mos.concepts import binding
from lib_mos.files import atomic_save_safetensors
from lib_mos.models import sd1
from lib_mos.models.clip_tokenizer import load_clip_tokenizer
from lib_mos.toyworld import codec as codec_mod
from lib_mos.toyworld import world

BASE_CONFIG = sd1.SD1Config(model_channels=32, unet_num_heads=2, context_dim=64, text_layers=2, text_heads=4,
                            text_intermediate=256)
STATE = "train-state.safetensors"
CODEC = "codec.safetensors"
LOG = "log.jsonl"
FINAL = "base.safetensors"


@dataclass(frozen=True)
class BaseSettings:
    steps: int = 8000
    batch_size: int = 32
    lr: float = 6e-4
    warmup: int = 300
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.999
    caption_dropout: float = 0.1
    single_only_fraction: float = 0.25  # curriculum: the first part of the run shows one object only
    two_fraction: float = 0.3  # afterwards, this share of 32x32 scenes has two objects
    # afterwards, this share of steps shows wide canvases of one object per 32-px cell (`wide_cells`
    # cells, one count per step, batch_size // cells pictures: the same pixels per step), so the
    # base learns to draw several objects side by side, as regions ask of it
    wide_fraction: float = 0.0
    wide_cells: tuple[int, ...] = (2, 3)
    init: str = ""  # a base checkpoint to start from (fine-tuning it) instead of fresh weights
    min_snr: float = 5.0
    seed: int = 0
    save_every: int = 250
    snapshot_every: int = 1000

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def cells_at(self, step: int) -> int:
        """Canvas width of step `step` in 32-px cells (a pure function of seed and step)."""
        if step < self.single_only_fraction * self.steps or not self.wide_fraction or not self.wide_cells:
            return 1
        rng = np.random.default_rng(self.seed * 1_000_003 + step + 3)
        return int(self.wide_cells[rng.integers(len(self.wide_cells))]) if rng.random() < self.wide_fraction else 1


def build_base(seed: int = 0) -> sd1.SD1Model:
    """A freshly initialised base model (ldm's and transformers' own initialisation, seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = sd1.build_unet(BASE_CONFIG).float()
        text_encoder = sd1.build_text_encoder(BASE_CONFIG).float()
    return sd1.SD1Model(unet=unet, text_encoder=text_encoder, tokenizer=load_clip_tokenizer(),
                        alphas_cumprod=sd1.sd1_alphas_cumprod(), config=BASE_CONFIG)


def _params(model: sd1.SD1Model) -> dict[str, torch.nn.Parameter]:
    return {**{f"unet.{k}": p for k, p in model.unet.named_parameters()},
            **{f"text.{k}": p for k, p in model.text_encoder.named_parameters()}}


def _lr(s: BaseSettings, step: int) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def captions_for(scenes: list[world.Scene], rng: np.random.Generator, dropout: float) -> list[str]:
    return ["" if rng.random() < dropout else s.caption() for s in scenes]


def training_batch(s: BaseSettings, step: int, codec: codec_mod.PatchCodec) -> tuple[torch.Tensor, list[str]]:
    """Latents [B, 4, 16, 16 * cells] and captions of step `step`: a pure function of (seed, step)."""
    two = 0.0 if step < s.single_only_fraction * s.steps else s.two_fraction
    seed = s.seed * 1_000_003 + step
    cells = s.cells_at(step)
    images, scenes = world.batch(seed, max(1, s.batch_size // cells), two_fraction=two, cells=cells)
    captions = captions_for(scenes, np.random.default_rng(seed + 7), s.caption_dropout)
    return codec.encode(codec_mod.to_tensor(images)), captions


def diffusion_loss(model: sd1.SD1Model, latents: torch.Tensor, context: torch.Tensor, gen: torch.Generator,
                   min_snr: float) -> torch.Tensor:
    """eps-MSE at uniform timesteps, min-SNR-weighted (Hang et al. 2023), as the sampler will query it."""
    b = latents.shape[0]
    t = torch.randint(0, len(model.alphas_cumprod), (b,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    ab = model.alphas_cumprod[t].view(b, 1, 1, 1)
    noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
    pred = model.unet(noisy, t, context=context)
    snr = (ab / (1 - ab)).view(b)
    weight = snr.clamp(max=min_snr) / snr
    return (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()


class BaseTrainer:
    def __init__(self, out: Path, settings: BaseSettings) -> None:
        self.out, self.s = out, settings
        self.model = build_base(settings.seed)
        if settings.init:
            start = _params(load_base(settings.init))
            with torch.no_grad():
                for k, p in _params(self.model).items():
                    p.copy_(start[k])
        self.params = _params(self.model)
        self.ema = {k: p.detach().clone() for k, p in self.params.items()}
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=settings.lr, betas=(0.9, 0.99),
                                     weight_decay=settings.weight_decay)
        self.step = 0
        codec_path = out / CODEC
        self.codec = codec_mod.PatchCodec.load(codec_path) if codec_path.exists() else codec_mod.PatchCodec.fit()

    # ---- state

    def save_state(self) -> None:
        tensors = {f"model.{k}": p.detach() for k, p in self.params.items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.items()}
        for k, p in self.params.items():
            st = self.opt.state.get(p)
            if st:
                tensors[f"adam_m.{k}"], tensors[f"adam_v.{k}"] = st["exp_avg"], st["exp_avg_sq"]
        meta = {"step": str(self.step), "settings": self.s.to_json()}
        atomic_save_safetensors({k: v.contiguous() for k, v in tensors.items()}, self.out / STATE, metadata=meta,
                                overwrite=True)

    def load_state(self) -> None:
        path = self.out / STATE
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            saved = json.loads(meta.get("settings", "{}"))
            mine = json.loads(self.s.to_json())  # as saved: tuples become lists
            changed = {k for k in mine if k not in ("steps", "save_every", "snapshot_every") and saved.get(k) != mine[k]}
            if changed:
                raise ValueError(f"{path}: the run was started with other settings ({sorted(changed)}); "
                                 "resume with the same ones or use a new folder")
            self.step = int(meta["step"])
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(f.get_tensor(f"model.{k}"))
                    self.ema[k].copy_(f.get_tensor(f"ema.{k}"))
                    if f"adam_m.{k}" in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                        self.opt.state[p] = {"step": torch.tensor(float(self.step)),
                                             "exp_avg": f.get_tensor(f"adam_m.{k}"),
                                             "exp_avg_sq": f.get_tensor(f"adam_v.{k}")}

    def ema_model(self) -> sd1.SD1Model:
        """A model holding the EMA weights (what is evaluated and shipped)."""
        model = build_base(self.s.seed)
        with torch.no_grad():
            for k, p in _params(model).items():
                p.copy_(self.ema[k])
        return model

    # ---- steps

    def train_step(self) -> float:
        s, step = self.s, self.step
        latents, captions = training_batch(s, step, self.codec)
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + step + 11)
        self.model.unet.train()
        self.model.text_encoder.train()
        ids = binding.tokenize(self.model, captions)
        context = self.model.text_encoder(input_ids=ids).last_hidden_state
        loss = diffusion_loss(self.model, latents, context, gen, s.min_snr)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), s.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = _lr(s, step)
        self.opt.step()
        decay = min(s.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in self.params.items():
                self.ema[k].lerp_(p.detach(), 1 - decay)
        self.step += 1
        return loss.item()


def train_base(out: str | Path, settings: BaseSettings, *, log: Callable[[str], None] = print,
               should_stop: Callable[[], bool] = lambda: False) -> Path | None:
    """Train (or resume) into folder `out`; returns the final fp16 checkpoint, or None if stopped early."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = BaseTrainer(out, settings)
    trainer.codec.save(out / CODEC)
    if (out / STATE).exists():
        trainer.load_state()
        log(f"resumed at step {trainer.step} from {out / STATE}")
    (out / "snapshots").mkdir(exist_ok=True)
    losses: list[float] = []
    start, first = time.perf_counter(), trainer.step
    with open(out / LOG, "a") as logf, contextlib.suppress(KeyboardInterrupt):
        while trainer.step < settings.steps:
            if should_stop():
                break
            losses.append(trainer.train_step())
            step = trainer.step
            if step % 25 == 0:
                rate = (step - first) / (time.perf_counter() - start)
                entry = {"step": step, "loss": round(float(np.mean(losses)), 5), "lr": _lr(settings, step - 1),
                         "steps_per_s": round(rate, 3), "time": round(time.time(), 1)}
                logf.write(json.dumps(entry) + "\n")
                logf.flush()
                log(f"step {step}/{settings.steps} loss {entry['loss']:.4f} lr {entry['lr']:.2e} {rate:.2f} it/s")
                losses = []
            if step % settings.save_every == 0 or step == settings.steps:
                trainer.save_state()
            if step % settings.snapshot_every == 0 or step == settings.steps:
                sd1.save_checkpoint(trainer.ema_model(), out / "snapshots" / f"ema-{step:06d}.safetensors",
                                    dtype=torch.float16, overwrite=True)
    trainer.save_state()
    if trainer.step < settings.steps:
        log(f"stopped at step {trainer.step}; run again to resume")
        return None
    final = sd1.save_checkpoint(trainer.ema_model(), out / FINAL, dtype=torch.float16, overwrite=True)
    log(f"wrote {final}")
    return final


def load_base(path: str | Path) -> sd1.SD1Model:
    """The fp16 checkpoint back in fp32 for CPU sampling and training."""
    model = sd1.load_checkpoint(path)
    model.unet.float().eval()
    model.text_encoder.float().eval()
    return model


def _main() -> None:  # pragma: no cover - thin CLI, see lib_mos.toyworld.__main__
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=BaseSettings.steps)
    args = parser.parse_args()
    train_base(args.out, BaseSettings(steps=args.steps))


if __name__ == "__main__":
    _main()

