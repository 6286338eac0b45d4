"""The toy world's stand-in for the VAE: a fixed linear 2x2-patch codec, 32x32x3 <-> 16x16x4.

Each 2x2 patch (12 numbers) is projected on its 4 principal directions over world pictures and
whitened, so the latent has SD's shape conventions (4 channels, about unit variance) at a size a
2-core CPU can train on. It is linear, so decoding never invents detail, and patterns on the
world's 2-pixel grid survive exactly. Fitted once from a fixed seed and stored beside the model.

The product's sampler and trainer count image sizes in SD pixels (8 per latent cell); a toy
picture of 32 world pixels is 128 of those, so `encoder()` takes 128x128 pixels (the trainer's
resolution) and `decoder()` returns the 32x32 pictures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from lib_mos.files import atomic_save_safetensors
from lib_mos.toyworld import world

LATENT = world.SIZE // 2
SD_PIXELS = LATENT * 8  # the size the product's sampler/trainer are told


class PatchCodec:
    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor) -> None:
        if mean.shape != (12,) or basis.shape != (12, 4) or scale.shape != (4,):
            raise ValueError("a patch codec is mean [12], basis [12, 4], scale [4]")
        self.mean, self.basis, self.scale = mean.float(), basis.float(), scale.float()

    @classmethod
    def fit(cls, seed: int = 0, n: int = 2048) -> PatchCodec:
        """Principal directions of 2x2 patches over n world pictures (base objects and novel styles)."""
        base, _ = world.batch(seed, n, two_fraction=0.3)
        styled = [world.batch(seed + 1 + i, n // 8, style=s)[0] for i, s in enumerate(world.STYLES)]
        pics = torch.from_numpy(np.concatenate([base, *styled])).permute(0, 3, 1, 2) * 2 - 1
        patches = _patches(pics).reshape(-1, 12).double()
        mean = patches.mean(0)
        evals, evecs = torch.linalg.eigh(torch.cov((patches - mean).T))
        basis = evecs[:, -4:].flip(1)  # largest first
        basis = basis * torch.sign(basis.sum(0, keepdim=True) + 1e-12)  # fixed sign
        scale = evals[-4:].flip(0).sqrt()
        return cls(mean.float(), basis.float(), scale.float())

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, 32, 32] in [-1, 1] -> [B, 4, 16, 16]."""
        p = _patches(pixels.float())  # [B, 16, 16, 12]
        z = ((p - self.mean.to(p)) @ self.basis.to(p)) / self.scale.to(p)
        return z.permute(0, 3, 1, 2).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 4, 16, 16] -> [B, 3, 32, 32] in about [-1, 1] (not clamped)."""
        z = latents.float().permute(0, 2, 3, 1)
        p = (z * self.scale.to(z)) @ self.basis.to(z).T + self.mean.to(z)  # [B, 16, 16, 12]
        b, h, w, _ = p.shape
        return p.reshape(b, h, w, 3, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, 2 * h, 2 * w)

    def round_trip(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(pixels))

    # ---- the product's trainer/sampler interfaces

    def encoder(self):
        """The ED-LoRA trainer's encoder: pixels [B, 3, 128, 128] in [-1, 1] -> (mean, std) latents."""
        def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            small = F.adaptive_avg_pool2d(pixels.float(), world.SIZE * pixels.shape[-1] // SD_PIXELS)
            z = self.encode(small).to(pixels.device)
            return z, torch.zeros_like(z)
        return encode

    def decoder(self):
        """Latents -> PIL pictures (the trainer's preview decoder)."""
        return lambda latents: to_pil(self.decode(latents))

    def save(self, path: str | Path) -> Path:
        return atomic_save_safetensors({"mean": self.mean, "basis": self.basis, "scale": self.scale}, path,
                                       overwrite=True)

    @classmethod
    def load(cls, path: str | Path) -> PatchCodec:
        t = load_file(str(path))
        missing = {"mean", "basis", "scale"} - set(t)
        if missing:
            raise ValueError(f"{path}: not a patch codec (missing {sorted(missing)})")
        return cls(t["mean"], t["basis"], t["scale"])


def _patches(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, H/2, W/2, 12] (channel-major within a patch)."""
    b, c, h, w = pixels.shape
    return pixels.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h // 2, w // 2, 12)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """World renders [B, 32, 32, 3] in [0, 1] -> [B, 3, 32, 32] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2 - 1


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    arr = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]
