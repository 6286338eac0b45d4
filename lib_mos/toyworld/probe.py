"""Probe classifiers: small CNNs that read a toy-world picture back into its attributes.

They are the judges of every number the toy world reports, so they are trained on ground-truth
renders only (never on model samples) and made robust to what generated pictures look like:
the codec's round trip, pixel noise, blur and small brightness changes. Two probes exist:

- attributes: shape, colour and texture of a single object, and whether one or two objects;
- concepts: which novel style an object is painted in, or "other" (a base object, or nothing).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from lib_mos.files import atomic_save_safetensors
from lib_mos.toyworld import codec as codec_mod
from lib_mos.toyworld import world

ATTRIBUTE_HEADS = {"shape": len(world.SHAPES), "colour": len(world.COLOURS), "texture": len(world.TEXTURES),
                   "count": 2}
OTHER = "other"


def concept_classes(styles: Sequence[str] = tuple(world.STYLES)) -> list[str]:
    return [*styles, OTHER]


class Probe(nn.Module):
    """Conv net over [B, 3, 32, 32] pictures in [-1, 1], one linear head per attribute."""

    def __init__(self, heads: dict[str, int], width: int = 32) -> None:
        super().__init__()
        self.heads_spec = dict(heads)
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2),
                                  block(2 * w, 4 * w), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(16 * w, n) for k, n in heads.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(pixels)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor, batch: int = 256) -> dict[str, np.ndarray]:
        self.eval()
        outs = [self(pixels[i:i + batch].float()) for i in range(0, len(pixels), batch)]
        return {k: torch.cat([o[k] for o in outs]).argmax(-1).numpy() for k in self.heads_spec}

    def save(self, path: str | Path, info: dict) -> Path:
        meta = {"heads": json.dumps(self.heads_spec), "info": json.dumps(info)}
        state = {k: v.detach().half().contiguous() for k, v in self.state_dict().items()}
        return atomic_save_safetensors(state, path, metadata=meta, overwrite=True)

    @classmethod
    def load(cls, path: str | Path) -> tuple[Probe, dict]:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "heads" not in meta:
                raise ValueError(f"{path}: not a toy-world probe (no 'heads' metadata)")
            probe = cls(json.loads(meta["heads"]))
            probe.load_state_dict({k: f.get_tensor(k).float() for k in f.keys()})  # noqa: SIM118
        return probe.eval(), json.loads(meta.get("info", "{}"))


# ------------------------------------------------------------------------------------ augmentation


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (3x3 kernel, sigma per image)."""
    d = torch.tensor([-1.0, 0.0, 1.0])
    k1 = torch.exp(-(d[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = k1[:, :, None] * k1[:, None, :]  # [B, 3, 3]
    b, c, h, w = x.shape
    weight = k2.repeat_interleave(c, 0)[:, None]  # [B*C, 1, 3, 3]
    out = F.conv2d(F.pad(x.reshape(1, b * c, h, w), (1, 1, 1, 1), mode="replicate"), weight, groups=b * c)
    return out.reshape(b, c, h, w)


def augment(pixels: torch.Tensor, codec: codec_mod.PatchCodec, gen: torch.Generator) -> torch.Tensor:
    """What a generated picture may look like: codec round trip, blur, brightness, noise."""
    b = pixels.shape[0]
    u = torch.rand(b, 4, generator=gen)
    x = torch.where((u[:, 0] < 0.7).view(b, 1, 1, 1), codec.round_trip(pixels), pixels)
    blurred = _blur(x, 0.3 + 0.6 * u[:, 1])
    x = torch.where((u[:, 2] < 0.5).view(b, 1, 1, 1), blurred, x)
    x = x * (0.9 + 0.2 * torch.rand(b, 1, 1, 1, generator=gen)) + 0.1 * (torch.rand(b, 3, 1, 1, generator=gen) - 0.5)
    x = x + torch.randn(x.shape, generator=gen) * (0.1 * u[:, 3]).view(b, 1, 1, 1)
    return x.clamp(-1.2, 1.2)


# ------------------------------------------------------------------------------------ data


def attribute_batch(seed: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images, scenes = world.batch(seed, n, two_fraction=0.3)
    labels = {k: torch.from_numpy(v) for k, v in world.attribute_labels(scenes).items()}
    labels["count"] = torch.tensor([len(s.things) - 1 for s in scenes])
    return codec_mod.to_tensor(images), labels


def concept_batch(seed: int, n: int, styles: Sequence[str] = tuple(world.STYLES)) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Half styled objects (label: the style), the rest base objects or an empty background ("other")."""
    rng = np.random.default_rng(seed)
    scenes, labels = [], []
    for _ in range(n):
        u = rng.random()
        if u < 0.5:
            k = int(rng.integers(len(styles)))
            scenes.append(world.random_scene(rng, style=styles[k]))
            labels.append(k)
        else:
            scene = world.random_scene(rng, 1 if u < 0.9 else 2)
            if u >= 0.97:
                scene = world.Scene((), scene.background)
            scenes.append(scene)
            labels.append(len(styles))
    images = np.stack([world.render(s) for s in scenes])
    return codec_mod.to_tensor(images), {"concept": torch.tensor(labels)}


# ------------------------------------------------------------------------------------ training


def train_probe(heads: dict[str, int], make_batch: Callable[[int, int], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                codec: codec_mod.PatchCodec, *, steps: int = 1500, batch: int = 128, lr: float = 2e-3, seed: int = 0,
                log: Callable[[str], None] = print) -> Probe:
    """Train on fresh renders every step (seeds 0..steps-1 offset by `seed`; held-out sets use others)."""
    torch.manual_seed(seed)
    probe = Probe(heads)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    probe.train()
    for step in range(steps):
        x, labels = make_batch(10_000_000 + seed * 100_000 + step, batch)
        out = probe(augment(x, codec, gen))
        loss = sum(F.cross_entropy(out[k], labels[k], ignore_index=-1) for k in heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"probe step {step + 1}/{steps} loss {loss.item():.4f}")
    return probe.eval()


def held_out_accuracy(probe: Probe, make_batch: Callable, codec: codec_mod.PatchCodec, *, n: int = 2000,
                      seed: int = 424242, augmented: bool = True) -> dict[str, float]:
    """Accuracy per head on renders from seeds training never used (with augmentation by default)."""
    x, labels = make_batch(seed, n)
    if augmented:
        x = augment(x, codec, torch.Generator().manual_seed(seed))
    pred = probe.predict(x)
    out = {}
    for k in probe.heads_spec:
        keep = labels[k].numpy() >= 0
        out[k] = float((pred[k][keep] == labels[k].numpy()[keep]).mean())
    return out
