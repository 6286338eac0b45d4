"""The image <-> latent codec of the concept trainer: SD1's KL autoencoder, or a linear stand-in.

The trainer needs posterior means/stds of its training views in the latent space the UNet sees
(already multiplied by SD's scale factor) and, for previews, images from latents. A real SD1
checkpoint carries its VAE as `first_stage_model.*`; it is rebuilt here from ldm's own Encoder and
Decoder (the classes the host runs) and filled from the .safetensors file without the host. The
tiny test models have no VAE, so they get a fixed linear codec that matches the sampler's preview
decode (`sampling.latents_to_images`), which keeps tests fast and the round trip meaningful.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lib_mos.models import sampling
from lib_mos.models.family import SD1
from lib_mos.models.sd1 import _default_device, _randomise

__all__ = [
    "SCALE_FACTOR",
    "VAE_PREFIX",
    "ImageDecoder",
    "ImageEncoder",
    "LdmVae",
    "PreviewDecoder",
    "PreviewEncoder",
    "image_codec",
    "random_vae_state",
    "read_vae",
]

SCALE_FACTOR = SD1.latent_scale  # the default: SD1's (each family's is in its row)
VAE_PREFIX = "first_stage_model."
_Z_CHANNELS = 4
_EMBED_DIM = 4
_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# Training leftovers some VAE files carry; the host drops them too (sd_vae.load_vae_dict).
_IGNORED_KEYS = ("model_ema.decay", "model_ema.num_updates")
_IGNORED_ROOTS = ("loss.",)

EncodeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
DecodeFn = Callable[[torch.Tensor], list[Image.Image]]


def _check_pixels(pixels: torch.Tensor) -> None:
    """Fail on a batch the 8x codecs would silently crop or misread."""
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels [B, 3, H, W], got {list(pixels.shape)}")
    if pixels.shape[-1] % sampling.LATENT_FACTOR or pixels.shape[-2] % sampling.LATENT_FACTOR:
        raise ValueError(f"image sides must be multiples of {sampling.LATENT_FACTOR}, got {list(pixels.shape[-2:])}")


def _check_latents(latents: torch.Tensor) -> None:
    if latents.dim() != 4 or latents.shape[1] != sampling.LATENT_CHANNELS:
        raise ValueError(f"expected latents [B, {sampling.LATENT_CHANNELS}, h, w], got {list(latents.shape)}")


# ------------------------------------------------------------------------------------ preview codec


class PreviewEncoder:
    """Pixels -> latents by the least-squares inverse of the preview's latent->RGB map.

    For models without a VAE (tests, tiny models): 8x average pooling, then the minimum-norm
    latent whose `LATENT_RGB` preview is that colour, so PreviewDecoder(PreviewEncoder(x)) is x
    downsampled 8x (exactly, up to 8-bit rounding and clipping). std is zero: the map is
    deterministic, so the trainer's posterior sampling reduces to the mean.
    """

    def __init__(self) -> None:
        # rgb = LATENT_RGB^T @ latent (see latents_to_images); pinv gives the [4, 3] right inverse.
        self.rgb_to_latent = torch.linalg.pinv(sampling.LATENT_RGB.double().T).float()

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pixels(pixels)
        pooled = F.avg_pool2d(pixels.float(), sampling.LATENT_FACTOR)
        mean = torch.einsum("brhw,cr->bchw", pooled, self.rgb_to_latent.to(pixels.device))
        return mean, torch.zeros_like(mean)


class PreviewDecoder:
    """Latents -> images with the sampler's preview decode (linear map, nearest x8)."""

    def __call__(self, latents: torch.Tensor) -> list[Image.Image]:
        _check_latents(latents)
        return sampling.latents_to_images(latents)


# -------------------------------------------------------------------------------------- SD1 VAE


@contextlib.contextmanager
def _plain_vae_attention() -> Iterator[None]:
    """Build ldm's plain-torch AttnBlock even where xformers is installed (its block fails on CPU),
    and keep ldm's construction chatter ("making attention of type ...") off stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        import ldm.modules.diffusionmodules.model as ldm_model

        saved = ldm_model.XFORMERS_IS_AVAILBLE
        ldm_model.XFORMERS_IS_AVAILBLE = False
        try:
            yield
        finally:
            ldm_model.XFORMERS_IS_AVAILBLE = saved


class LdmVae(nn.Module):
    """SD1's AutoencoderKL without the training parts: ldm Encoder/Decoder plus the 1x1 quant convs.

    Only `ch` varies (128 in SD1.x); everything else is v1-inference.yaml's ddconfig, so the state
    dict keys are exactly a checkpoint's `first_stage_model.*` keys without the prefix.
    """

    def __init__(self, ch: int = 128, *, device: torch.device | str | None = None,
                 scale: float = SCALE_FACTOR) -> None:
        super().__init__()
        if not isinstance(ch, int) or ch <= 0 or ch % 32:
            raise ValueError(f"VAE width ch must be a positive multiple of 32 (GroupNorm groups), got {ch!r}")
        ddconfig: dict[str, Any] = {
            "double_z": True, "z_channels": _Z_CHANNELS, "resolution": 256, "in_channels": 3, "out_ch": 3,
            "ch": ch, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
        }
        with _plain_vae_attention():
            from ldm.modules.diffusionmodules.model import Decoder, Encoder

            with _default_device(device):
                self.encoder = Encoder(**ddconfig)
                self.decoder = Decoder(**ddconfig)
                self.quant_conv = nn.Conv2d(2 * _Z_CHANNELS, 2 * _EMBED_DIM, 1)
                self.post_quant_conv = nn.Conv2d(_EMBED_DIM, _Z_CHANNELS, 1)
        self.ch, self.scale = ch, scale  # scale: the family's latent scale (SDXL's VAE has the same shape)

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, std) of pixels in [-1, 1], both times the latent scale (the UNet's space)."""
        _check_pixels(pixels)
        moments = self.quant_conv(self.encoder(pixels))
        mean, logvar = torch.chunk(moments, 2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean * self.scale, std * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels clamped to [-1, 1]."""
        _check_latents(latents)
        return self.decoder(self.post_quant_conv(latents / self.scale)).clamp(-1.0, 1.0)


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Run the VAE at the dtype it was loaded with, even inside a caller's autocast region."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # pragma: no cover - a device type autocast does not know
        return contextlib.nullcontext()


class ImageEncoder:
    """The trainer's encoder over an LdmVae, following the VAE wherever it currently lives.

    Returns float32 (mean, std) on the device the pixels came from, so the VAE may sit in half
    precision or be moved off the GPU between calls.
    """

    def __init__(self, vae: LdmVae) -> None:
        self.vae = vae

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pixels(pixels)
        vae = self.vae
        with torch.no_grad(), _autocast_off(vae.device):
            mean, std = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype))
        return mean.float().to(pixels.device), std.float().to(pixels.device)


class ImageDecoder:
    """The trainer's preview decoder over an LdmVae: scaled latents -> RGB PIL images.

    Decodes one image at a time: the decoder's full-resolution activations dominate memory.
    """

    def __init__(self, vae: LdmVae) -> None:
        self.vae = vae

    def __call__(self, latents: torch.Tensor) -> list[Image.Image]:
        _check_latents(latents)
        vae = self.vae
        images = []
        with torch.no_grad(), _autocast_off(vae.device):
            for row in latents:
                x = vae.decode(row[None].to(device=vae.device, dtype=vae.dtype))[0].float().cpu()
                x = ((x.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
                images.append(Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).numpy()), mode="RGB"))
        return images


# ---------------------------------------------------------------------------------------- file IO


def _open_safetensors(path: Path) -> Any:
    """safe_open with load_checkpoint's errors: a missing file, or content that is not safetensors
    (pickled .ckpt/.pt files are never unpickled here)."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .safetensors file: {exc}") from exc


def _vae_prefix(keys: list[str]) -> str | None:
    """Where a file keeps its VAE: under first_stage_model. (full checkpoint), at the root
    (standalone VAE file), or nowhere (None)."""
    if any(k.startswith(VAE_PREFIX) for k in keys):
        return VAE_PREFIX
    if any(k.startswith(_VAE_ROOTS) for k in keys):
        return ""
    return None


def _vae_keys(keys: list[str], prefix: str) -> list[str]:
    """The file's VAE keys without prefix; a standalone file's other keys count as unexpected."""
    found = [k[len(prefix):] for k in keys if k.startswith(prefix)] if prefix else list(keys)
    return [k for k in found if k not in _IGNORED_KEYS and not k.startswith(_IGNORED_ROOTS)]


def _infer_ch(path: Path, prefix: str, shapes: Mapping[str, list[int]]) -> int:
    key = "encoder.conv_in.weight"
    if key not in shapes:
        raise ValueError(f"{path}: missing VAE key {prefix + key!r}; cannot infer the VAE width")
    shape = shapes[key]
    if len(shape) != 4 or shape[1:] != [3, 3, 3] or shape[0] <= 0 or shape[0] % 32:
        raise ValueError(
            f"{path}: VAE key {prefix + key!r} has shape {shape}; expected [ch, 3, 3, 3] with ch a "
            f"multiple of 32 (an SD1 KL-f8 autoencoder)"
        )
    return shape[0]


def _read_vae_from(path: Path, handle: Any, prefix: str, device: torch.device | str, dtype: torch.dtype,
                   scale: float = SCALE_FACTOR) -> LdmVae:
    """Strictly fill an LdmVae from an open file: every key, exact shapes, nothing unknown."""
    file_keys = {k: prefix + k for k in _vae_keys(list(handle.keys()), prefix)}
    shapes = {k: list(handle.get_slice(full).get_shape()) for k, full in file_keys.items()}
    ch = _infer_ch(path, prefix, shapes)
    with torch.random.fork_rng(devices=[]):
        vae = LdmVae(ch, device="meta", scale=scale)
    expected = {k: list(v.shape) for k, v in vae.state_dict().items()}
    unexpected = sorted(set(file_keys) - set(expected))
    if unexpected:
        raise ValueError(f"{path}: unexpected VAE key {file_keys[unexpected[0]]!r} (not part of the SD1 VAE)")
    state: dict[str, torch.Tensor] = {}
    for key, want in expected.items():
        if key not in file_keys:
            raise ValueError(f"{path}: missing VAE key {prefix + key!r}")
        if shapes[key] != want:
            raise ValueError(f"{path}: VAE key {prefix + key!r} has shape {shapes[key]}, expected {want}")
        tensor = handle.get_tensor(file_keys[key])
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: VAE key {prefix + key!r} has dtype {tensor.dtype}, expected a float")
        state[key] = tensor.to(device=device, dtype=dtype)
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def read_vae(
    path: str | os.PathLike[str], *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    scale: float = SCALE_FACTOR,
) -> LdmVae:
    """The VAE of an SD1 .safetensors checkpoint (`first_stage_model.*`) or of a standalone VAE file.

    Only the VAE tensors are read. Loading is strict: a missing, unexpected or misshapen key is a
    ValueError naming the file and the key. The module comes back in eval mode, without grads.
    """
    path = Path(path)
    with _open_safetensors(path) as handle:
        keys = list(handle.keys())
        prefix = _vae_prefix(keys)
        if prefix is None:
            sample = ", ".join(keys[:3]) or "no tensors"
            raise ValueError(
                f"{path}: no VAE tensors (neither '{VAE_PREFIX}*' nor 'encoder.*'/'decoder.*' keys; "
                f"found e.g. {sample})"
            )
        return _read_vae_from(path, handle, prefix, device, dtype, scale)


def image_codec(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae: str | os.PathLike[str] | None = None,
    scale: float = SCALE_FACTOR,
) -> tuple[EncodeFn, DecodeFn, str]:
    """(encoder, decoder, description) for training on the checkpoint at `path`.

    `vae` (a standalone VAE or another checkpoint) replaces the checkpoint's own. A checkpoint
    without VAE tensors gets the linear preview codec, which is only good for tests and tiny
    models; the description says which codec was chosen so the caller can show it.
    """
    if vae is not None:
        source = Path(vae)
        model = read_vae(source, device=device, dtype=dtype, scale=scale)
        return ImageEncoder(model), ImageDecoder(model), f"VAE from {source.name}"
    source = Path(path)
    with _open_safetensors(source) as handle:
        keys = list(handle.keys())
        if any(k.startswith(VAE_PREFIX) for k in keys):
            model = _read_vae_from(source, handle, VAE_PREFIX, device, dtype, scale)
            return ImageEncoder(model), ImageDecoder(model), f"VAE from {source.name}"
    return (
        PreviewEncoder(),
        PreviewDecoder(),
        f"{source.name} has no VAE ('{VAE_PREFIX}*' keys): images are encoded with a linear preview "
        f"codec (for tests and tiny models only)",
    )


def random_vae_state(seed: int, ch: int = 32) -> dict[str, torch.Tensor]:
    """A random-weight VAE state dict (keys without prefix) that depends only on `seed` and `ch`.

    For tests: the weights are well conditioned (sd1's randomiser) rather than ldm's default init,
    and the global RNG is left alone.
    """
    with torch.random.fork_rng(devices=[]):
        vae = LdmVae(ch)
    _randomise(vae, torch.Generator(device="cpu").manual_seed(seed))
    return {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
