"""Random-weight, full-size SD1.5 and SDXL checkpoints in the WebUI's key layout, for the real-host
suite (no SD weights can be downloaded here).

UNet and text encoders come from `lib_mos.models.sd1` / `lib_mos.models.sdxl` (built on the meta
device); the VAE has the layout of ldm's AutoencoderKL with the host's `configs/v1-inference.yaml`
settings (SDXL's VAE has the same layout), so the host decodes real (if meaningless) pictures
instead of a flat grey. Values come from `lib_mos.models.sd1._randomise`, module by module,
streamed straight into the .safetensors file: peak memory is about one layer, except SDXL's bigG
text encoder, which is filled whole and written in OpenCLIP's names (fused q/k/v:
`lib_mos.models.sdxl.te2_to_openclip`), about 3 GB.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

from lib_mos.models.sd1 import (
    CONFIG_METADATA_KEY,
    SD15,
    TEXT_PREFIX,
    UNET_PREFIX,
    _randomise,
    build_sd15_skeleton,
    sd1_alphas_cumprod,
)

VAE_PREFIX = "first_stage_model."
_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
            num_res_blocks=2, attn_resolutions=[], dropout=0.0)  # v1-inference.yaml first_stage_config
_SKIPPED_BUFFERS = {"text_model.embeddings.position_ids"}  # derived by the host


class _Autoencoder(nn.Module):
    """AutoencoderKL's parameters (encoder, decoder, quant convs) without its lightning base."""

    def __init__(self) -> None:
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        self.encoder, self.decoder = Encoder(**_VAE), Decoder(**_VAE)
        self.quant_conv = nn.Conv2d(2 * _VAE["z_channels"], 8, 1)
        self.post_quant_conv = nn.Conv2d(4, _VAE["z_channels"], 1)


def _leaf_parameters(prefix: str, model: nn.Module) -> list[tuple[nn.Module, list[tuple[str, str]]]]:
    """[(module, [(file key, parameter name)])] for every module owning parameters, in the order
    `_randomise` visits them, so filling them one by one equals randomising the whole model."""
    out = []
    for name, sub in sorted(model.named_modules(), key=lambda item: item[0]):
        own = sorted(n for n, _ in sub.named_parameters(recurse=False))
        if own:
            dot = f"{name}." if name else ""
            out.append((sub, [(f"{prefix}{dot}{p}", p) for p in own]))
    unexpected = [b for b, _ in model.named_buffers() if b not in _SKIPPED_BUFFERS]
    if unexpected:
        raise RuntimeError(f"{prefix}: buffers a checkpoint would need: {unexpected}")
    return out


Unit = tuple[nn.Module, list[tuple[str, str]]]  # a module owning parameters, [(file key, parameter name)]


def _write(path: Path, units: list[Unit | tuple[nn.Module, str, object]], extra: dict[str, torch.Tensor],
           metadata: dict[str, str], seed: int, dtype: torch.dtype) -> Path:
    """Stream the units into a .safetensors file (atomically): each plain unit is filled by
    `_randomise` and written; a (module, prefix, convert) unit is filled whole and written as
    `convert(state)`, whose key order and shapes the header takes from the meta module."""
    st_dtype = {torch.float16: "F16", torch.float32: "F32"}[dtype]
    size = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {}
    offset = 0

    def add(key: str, shape: list[int], n_bytes: int, kind: str) -> None:
        nonlocal offset
        header[key] = {"dtype": kind, "shape": shape, "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes

    for unit in units:
        if len(unit) == 3:
            module, prefix, convert = unit
            state = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
            for key, value in convert(state).items():
                add(prefix + key, list(value.shape), value.numel() * size, st_dtype)
        else:
            sub, keys = unit
            for key, name in keys:
                add(key, list(getattr(sub, name).shape), getattr(sub, name).numel() * size, st_dtype)
    for key, value in extra.items():
        add(key, list(value.shape), value.numel() * value.element_size(), "F32")
    header["__metadata__"] = {**metadata, "random_seed": str(seed)}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)) + blob)
            for unit in units:
                if len(unit) == 3:
                    module, _, convert = unit
                    module.to_empty(device="cpu")
                    _randomise(module, gen)
                    state = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
                    for value in convert(state).values():
                        fh.write(value.detach().to(dtype).contiguous().numpy().tobytes())
                    module.to_empty(device="meta")
                    continue
                sub, keys = unit
                sub.to_empty(device="cpu", recurse=False)
                _randomise(sub, gen)
                for _, name in keys:
                    fh.write(getattr(sub, name).detach().to(dtype).contiguous().numpy().tobytes())
                sub.to_empty(device="meta", recurse=False)
            for value in extra.values():
                fh.write(value.float().contiguous().numpy().tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_random_sd15(path: str | os.PathLike[str], *, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write the SD1.5 checkpoint (atomically); returns its path."""
    skeleton = build_sd15_skeleton()
    with torch.device("meta"):
        vae = _Autoencoder()
    units = [leaf for prefix, model in ((UNET_PREFIX, skeleton.unet), (TEXT_PREFIX, skeleton.text_encoder),
                                        (VAE_PREFIX, vae)) for leaf in _leaf_parameters(prefix, model)]
    return _write(Path(path), units, {"alphas_cumprod": sd1_alphas_cumprod()}, {CONFIG_METADATA_KEY: SD15.to_json()},
                  seed, dtype)


def write_random_sdxl(path: str | os.PathLike[str], *, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write the SDXL base checkpoint (atomically); returns its path. About 6.9 GB in fp16."""
    from lib_mos.models import sdxl

    skeleton = sdxl.build_sdxl_skeleton()
    te1, te2 = skeleton.text_encoders
    with torch.device("meta"):
        vae = _Autoencoder()
    units: list = [*_leaf_parameters(sdxl.SDXL.unet_prefix, skeleton.unet),
                   *_leaf_parameters(sdxl.TE1_PREFIX, te1),
                   (te2, sdxl.TE2_PREFIX, sdxl.te2_to_openclip),
                   *_leaf_parameters(VAE_PREFIX, vae)]
    return _write(Path(path), units, {}, {sdxl.CONFIG_METADATA_KEY: skeleton.config.to_json()}, seed, dtype)
