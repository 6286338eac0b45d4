"""Any supported checkpoint by what it holds: the family's row decides which builder reads it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lib_mos.models.family import SD1, SDXL, ModelFamily
from lib_mos.models.sd1 import SD1Model
from lib_mos.models.sdxl import TE1_PREFIX, SDXLModel


def family_of_checkpoint(path: str | os.PathLike[str]) -> ModelFamily:
    """SDXL when the file has SDXL's conditioner (`conditioner.embedders.*`), else SD1 (whose
    reader names what the file is when it is neither: SD2, no UNet, ...). Reads the header only."""
    from lib_mos.tensorfile import TensorFile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with TensorFile(path) as handle:
        return SDXL if any(k.startswith(TE1_PREFIX) for k in handle) else SD1


def load_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, unet: bool = True) -> SD1Model | SDXLModel:
    """An SD1 or SDXL .safetensors checkpoint in the host's layout, its UNet and text encoders in
    `dtype` on `device` (half precision for frozen weights that only carry a run); `unet=False`
    leaves the UNet's weights on the meta device, checked but not read."""
    from lib_mos.models import sd1, sdxl

    if family_of_checkpoint(path) is SDXL:
        return sdxl.load_checkpoint(path, device=device, dtype=dtype, unet=unet)
    return sd1.load_checkpoint(path, device=device, dtype=dtype, unet=unet)
