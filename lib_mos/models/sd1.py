"""Stable Diffusion 1.x topology in one place: configs, model builders, module names, checkpoint IO.

Everything in the project that needs to know how an SD1 UNet or text encoder is laid out (which
attn2 modules exist and in which order, what the LoRA-able linears are called, how the host names
checkpoint keys) asks this module, so the tiny test models and real SD1.5 share one definition.
The UNet is the real `ldm` class the host runs; the text encoder is transformers' CLIPTextModel,
as in the host's `cond_stage_model.wrapped.transformer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lib_mos.files import atomic_save_safetensors
from lib_mos.models.family import SD1, ModelFamily

if TYPE_CHECKING:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from lib_mos.tensorfile import TensorFile

__all__ = [
    "ATTN2_NAMES",
    "CONFIG_METADATA_KEY",
    "SD15",
    "TEXT_PREFIX",
    "TINY_SD1",
    "UNET_PREFIX",
    "SD1Config",
    "SD1Model",
    "build_sd15_skeleton",
    "build_text_encoder",
    "build_tiny_sd1",
    "build_unet",
    "load_checkpoint",
    "save_checkpoint",
    "sd1_alphas_cumprod",
    "text_attention_linear_names",
    "text_lora_linear_names",
    "unet_attention_linear_names",
]

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."
CONFIG_METADATA_KEY = "lib_mos.sd1_config"
_POSITION_IDS = "text_model.embeddings.position_ids"
_BOS_ID, _EOS_ID, _PAD_ID = 49406, 49407, 1


def check_positive_ints(config: Any) -> None:
    """Every field of a model config dataclass is a positive int (widths, counts), or a ValueError
    naming the field."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(config).__name__}.{field.name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class SD1Config:
    """Widths of an SD1-topology model; defaults are SD1.5. Depth/resolution layout is fixed."""

    model_channels: int = 320
    unet_num_heads: int = 8
    context_dim: int = 768  # also the text encoder's hidden size
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    vocab_size: int = 49408
    max_positions: int = 77

    def __post_init__(self) -> None:
        check_positive_ints(self)
        # ldm's GroupNorm uses 32 groups at every width the UNet reaches.
        if self.model_channels % 32:
            raise ValueError(f"SD1Config.model_channels must be a multiple of 32, got {self.model_channels}")
        if self.model_channels % self.unet_num_heads:
            raise ValueError("SD1Config.model_channels must be divisible by unet_num_heads")
        if self.context_dim % self.text_heads:
            raise ValueError("SD1Config.context_dim must be divisible by text_heads")
        if self.vocab_size <= _EOS_ID:
            raise ValueError(f"SD1Config.vocab_size must hold the CLIP special ids (> {_EOS_ID})")

    def to_json(self) -> str:
        """Serialise for safetensors metadata (which only holds strings)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SD1Config:
        """Inverse of to_json; unknown or missing fields are errors so a mismatch is never silent."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("SD1Config JSON must be an object")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise ValueError(f"SD1Config JSON fields {sorted(data)} do not match {sorted(names)}")
        return cls(**data)


TINY_SD1 = SD1Config(model_channels=32, context_dim=32, text_heads=4, text_intermediate=64)
SD15 = SD1Config()


# --------------------------------------------------------------------------------------------- names

ATTN2_NAMES: tuple[str, ...] = SD1.attn2
_ATTN_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_TEXT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def unet_attention_linear_names(family: ModelFamily = SD1) -> list[str]:
    """The attention linears (attn1 then attn2 per block, q/k/v/out) in the family's attn2 order
    (SD1: 128, SDXL: 560)."""
    names = []
    for attn2 in family.attn2:
        block = attn2.removesuffix(".attn2")
        for attn in ("attn1", "attn2"):
            names.extend(f"{block}.{attn}.{proj}" for proj in _ATTN_PROJECTIONS)
    return names


def text_attention_linear_names(n_layers: int = 12, root: str = "") -> list[str]:
    """The self-attention linears of a CLIPTextModel, layer by layer, q/k/v/out (`root`: the
    encoder's prefix in a model's text root, SDXL's "0." or "1.")."""
    return [
        f"{root}text_model.encoder.layers.{i}.self_attn.{proj}"
        for i in range(n_layers)
        for proj in _TEXT_PROJECTIONS
    ]


def text_lora_linear_names(model: Any) -> list[str]:
    """The self-attention linears of every text encoder of `model` (SD1Model or SDXLModel), named
    from its text root: SD1.5's 48, SDXL's CLIP-L ("0.") then bigG ("1.")."""
    family = model.family
    return [name for spec, encoder in zip(family.text_encoders, family.text_encoder_modules(model.text_root))
            for name in text_attention_linear_names(len(encoder.text_model.encoder.layers), spec.root)]


# ------------------------------------------------------------------------------------------ builders


@dataclass
class SD1Model:
    """An SD1 model as the project sees it, outside or inside the host."""

    unet: UNetModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer | None
    alphas_cumprod: torch.Tensor
    config: SD1Config
    family = SD1

    @property
    def text_root(self) -> CLIPTextModel:
        """The module text LoRA names are rooted at (SD1: the one encoder)."""
        return self.text_encoder


@contextlib.contextmanager
def _default_device(device: torch.device | str | None) -> Iterator[None]:
    """Construct modules directly on `device` (meta allocates nothing)."""
    if device is None:
        yield
        return
    with torch.device(device):
        yield


@contextlib.contextmanager
def _plain_ldm_attention() -> Iterator[None]:
    """Make ldm build CrossAttention even when xformers is installed.

    The host hijacks ldm the same way (its MemoryEfficientCrossAttention is an alias of
    CrossAttention), and our hooks target that class's interface.
    """
    import ldm.modules.attention as ldm_attention

    saved = ldm_attention.XFORMERS_IS_AVAILBLE
    ldm_attention.XFORMERS_IS_AVAILBLE = False
    try:
        yield
    finally:
        ldm_attention.XFORMERS_IS_AVAILBLE = saved


def build_unet(cfg: SD1Config, device: torch.device | str | None = None) -> UNetModel:
    """The host's ldm UNetModel with SD1's v1-inference.yaml topology at cfg's width (16 attn2)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with _plain_ldm_attention(), _default_device(device):
        unet = UNetModel(
            image_size=32,
            in_channels=4,
            out_channels=4,
            model_channels=cfg.model_channels,
            num_res_blocks=2,
            attention_resolutions=(4, 2, 1),
            channel_mult=SD1.channel_mult,
            num_heads=cfg.unet_num_heads,
            use_spatial_transformer=True,
            transformer_depth=1,
            context_dim=cfg.context_dim,
            use_checkpoint=False,
            legacy=False,
        )
    return unet.eval()


def _skip_hf_init(device: torch.device | str | None) -> contextlib.AbstractContextManager[Any]:
    """Skip transformers' weight init on meta: it has no effect there, and the first meta normal_()
    costs ~2 s (torch imports its reference implementations)."""
    if device is None or torch.device(device).type != "meta":
        return contextlib.nullcontext()
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - only a speed-up
        return contextlib.nullcontext()
    return no_init_weights()


def build_text_encoder(cfg: SD1Config, device: torch.device | str | None = None) -> CLIPTextModel:
    """transformers' CLIPTextModel configured like SD1.5's openai/clip-vit-large-patch14 text tower."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_cfg = CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.context_dim,
        intermediate_size=cfg.text_intermediate,
        projection_dim=cfg.context_dim,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_positions,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=_BOS_ID,
        eos_token_id=_EOS_ID,
        pad_token_id=_PAD_ID,
    )
    with _default_device(device), _skip_hf_init(device):
        model = CLIPTextModel(text_cfg)
    return model.eval()


def sd1_alphas_cumprod() -> torch.Tensor:
    """SD1's "scaled linear" DDPM schedule (1000 steps), computed in float64 like ldm, returned float32."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def _randomise(module: nn.Module, gen: torch.Generator) -> None:
    """Give every parameter a non-trivial value from `gen` alone.

    ldm zero-initialises output convs / proj_out, which would make whole paths (and any LoRA on
    them) invisible in the output. Weights get N(0, 1/fan_in) so activations stay O(1) through the
    deep residual stack; norms get weight≈1 so they stay well conditioned; biases are small.
    """
    norm_types = (nn.GroupNorm, nn.LayerNorm)
    with torch.no_grad():
        for _, sub in sorted(module.named_modules(), key=lambda item: item[0]):
            for pname, param in sorted(sub.named_parameters(recurse=False), key=lambda item: item[0]):
                if isinstance(sub, norm_types):
                    base = 1.0 if pname == "weight" else 0.0
                    values = base + 0.1 * torch.randn(param.shape, generator=gen)
                elif param.dim() >= 2:
                    fan_in = math.prod(param.shape[1:])
                    std = 1.0 / math.sqrt(fan_in) if not isinstance(sub, nn.Embedding) else 0.5
                    values = std * torch.randn(param.shape, generator=gen)
                else:
                    values = 0.02 * torch.randn(param.shape, generator=gen)
                param.copy_(values)


def build_tiny_sd1(seed: int = 0) -> SD1Model:
    """A TINY_SD1 model with random weights that depend only on `seed` (bit-identical across runs).

    The global RNG is left untouched so callers' own seeding is not disturbed.
    """
    from lib_mos.models.clip_tokenizer import load_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        unet = build_unet(TINY_SD1)
        text_encoder = build_text_encoder(TINY_SD1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    _randomise(unet, gen)
    _randomise(text_encoder, gen)
    return SD1Model(
        unet=unet.float().eval(),
        text_encoder=text_encoder.float().eval(),
        tokenizer=load_clip_tokenizer(),
        alphas_cumprod=sd1_alphas_cumprod(),
        config=TINY_SD1,
    )


def build_sd15_skeleton() -> SD1Model:
    """Full-size SD1.5 on the meta device: all names and shapes, no memory, no tokenizer."""
    with torch.random.fork_rng(devices=[]):
        unet = build_unet(SD15, device="meta")
        text_encoder = build_text_encoder(SD15, device="meta")
    return SD1Model(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=None,
        alphas_cumprod=torch.empty(1000, device="meta"),
        config=SD15,
    )


# ------------------------------------------------------------------------------------ checkpoint IO


def _expected_text_keys(text_encoder: nn.Module) -> dict[str, torch.Size]:
    """Text encoder keys a checkpoint must provide (position_ids is derived, never trusted from files)."""
    return {k: v.shape for k, v in text_encoder.state_dict().items() if k != _POSITION_IDS}


def save_checkpoint(
    model: SD1Model,
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Save in the host's SD1 .safetensors layout (loadable by A1111 and by load_checkpoint).

    Float weights are cast to `dtype`; alphas_cumprod stays float32 (sampling precision).
    """
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.unet.state_dict().items():
        tensors[UNET_PREFIX + key] = value.to(dtype) if value.is_floating_point() else value
    for key, value in model.text_encoder.state_dict().items():
        if key == _POSITION_IDS:
            continue
        tensors[TEXT_PREFIX + key] = value.to(dtype) if value.is_floating_point() else value
    tensors["alphas_cumprod"] = model.alphas_cumprod.to(torch.float32)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {CONFIG_METADATA_KEY: model.config.to_json()}
    return atomic_save_safetensors(tensors, path, metadata=metadata, overwrite=overwrite)


# Old checkpoints store the text encoder without the `text_model.` level (pre-4.x transformers);
# the host renames them the same way.
_LEGACY_TEXT_KEY = re.compile(r"^(embeddings|encoder|final_layer_norm)\.")


def _canonical_key(file_key: str) -> str:
    """File key with legacy text-encoder keys moved under `text_model.` (as the host does)."""
    if not file_key.startswith(TEXT_PREFIX):
        return file_key
    key = file_key[len(TEXT_PREFIX) :]
    return TEXT_PREFIX + ("text_model." + key if _LEGACY_TEXT_KEY.match(key) else key)


def _infer_config(path: Path, shapes: Mapping[str, list[int]]) -> SD1Config:
    """Recover widths from tensor shapes using SD1.5 conventions (8 UNet heads, 64-dim text heads)."""

    def shape(key: str) -> list[int]:
        if key not in shapes:
            raise ValueError(f"{path}: missing key {key!r}; cannot infer the SD1 model configuration")
        return shapes[key]

    model_channels = shape(UNET_PREFIX + "input_blocks.0.0.weight")[0]
    context_dim = shape(UNET_PREFIX + ATTN2_NAMES[0] + ".to_k.weight")[1]
    vocab_size, hidden = shape(TEXT_PREFIX + "text_model.embeddings.token_embedding.weight")
    max_positions = shape(TEXT_PREFIX + "text_model.embeddings.position_embedding.weight")[0]
    intermediate = shape(TEXT_PREFIX + "text_model.encoder.layers.0.mlp.fc1.weight")[0]
    layer_ids = {
        int(m.group(1))
        for k in shapes
        if (m := re.match(re.escape(TEXT_PREFIX) + r"text_model\.encoder\.layers\.(\d+)\.", k))
    }
    if hidden != context_dim:
        raise ValueError(
            f"{path}: text hidden size {hidden} != UNet context_dim {context_dim}; not an SD1 model"
        )
    if hidden % 64:
        raise ValueError(
            f"{path}: text hidden size {hidden} is not a multiple of 64 and the file has no "
            f"{CONFIG_METADATA_KEY!r} metadata; cannot infer the number of text attention heads"
        )
    if layer_ids != set(range(len(layer_ids))):
        raise ValueError(f"{path}: text encoder layer indices are not contiguous: {sorted(layer_ids)}")
    try:
        return SD1Config(
            model_channels=model_channels,
            unet_num_heads=8,
            context_dim=context_dim,
            text_layers=len(layer_ids),
            text_heads=hidden // 64,
            text_intermediate=intermediate,
            vocab_size=vocab_size,
            max_positions=max_positions,
        )
    except ValueError as exc:
        raise ValueError(f"{path}: inferred an invalid SD1 configuration: {exc}") from exc


def _reject_other_families(path: Path, keys: list[str], shapes: Mapping[str, list[int]]) -> None:
    """Name what the file is when it is not SD1, instead of failing later on a random key."""
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ValueError(
            f"{path}: this is an SDXL checkpoint ('conditioner.embedders.*' keys); only SD1.x is supported"
        )
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        sample = ", ".join(keys[:3]) or "no tensors"
        raise ValueError(
            f"{path}: no '{UNET_PREFIX}*' keys (found e.g. {sample}); not an SD1 checkpoint in A1111 layout"
        )
    k_key = UNET_PREFIX + ATTN2_NAMES[0] + ".to_k.weight"
    context = shapes[k_key][1] if k_key in shapes and len(shapes[k_key]) == 2 else None
    if context == 2048:
        raise ValueError(f"{path}: cross-attention context_dim is 2048 (SDXL); only SD1.x is supported")
    if context == 1024 or any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ValueError(
            f"{path}: this is an SD2.x checkpoint (OpenCLIP text encoder, context 1024); only SD1.x is supported"
        )
    if not any(k.startswith(TEXT_PREFIX) for k in keys):
        raise ValueError(
            f"{path}: no '{TEXT_PREFIX}*' text encoder keys; not an SD1 checkpoint in A1111 layout"
        )


def _load_into(
    path: Path,
    module: nn.Module,
    expected: Mapping[str, torch.Size],
    canon: Mapping[str, str],
    shapes: Mapping[str, list[int]],
    handle: TensorFile,
    prefix: str,
    what: str,
    read: bool = True,
) -> None:
    """Strictly fill `module` from the file keys under `prefix`: every expected key, exact shapes,
    nothing unknown (position_ids excepted: it is derived, and some files carry a corrupt copy).
    Tensor by tensor into the module's own memory, so the peak is the model plus one tensor;
    `read=False` only checks."""
    present = {c[len(prefix) :] for c in canon if c.startswith(prefix)}
    present.discard(_POSITION_IDS)
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise ValueError(
            f"{path}: unexpected {what} key {prefix + unexpected[0]!r} (not part of the SD1 topology)"
        )
    for key, want in expected.items():
        full = prefix + key
        if key not in present:
            raise ValueError(f"{path}: missing {what} key {full!r}")
        if list(want) != shapes[full]:
            raise ValueError(f"{path}: {what} key {full!r} has shape {shapes[full]}, expected {list(want)}")
    if not read:
        return
    targets = module.state_dict(keep_vars=True)
    for key in expected:
        handle.read_into(canon[prefix + key], targets[key])


def load_checkpoint(
    path: str | os.PathLike[str], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    unet: bool = True,
) -> SD1Model:
    """Load an SD1 .safetensors checkpoint (A1111 layout) into `dtype` models on `device`.

    Only the UNet, text encoder and alphas_cumprod are read; VAE and other extra keys are ignored.
    The models are built on the meta device, materialised once in `dtype` (no random init, no
    float32 copy of a half-precision model) and filled tensor by tensor from plain file reads.
    `unet=False`: the UNet's keys and shapes are checked, its weights stay on the meta device
    (`checkpoint_parts.CheckpointWeights` reads them when needed).
    """
    from lib_mos.models.clip_tokenizer import load_clip_tokenizer
    from lib_mos.tensorfile import TensorFile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with TensorFile(path) as handle:
        # canonical key (legacy text keys renamed) -> key as stored in the file
        canon = {_canonical_key(k): k for k in handle}
        shapes = {c: list(handle.shape(k)) for c, k in canon.items()}
        metadata = handle.metadata
        _reject_other_families(path, list(canon), shapes)
        if CONFIG_METADATA_KEY in metadata:
            try:
                config = SD1Config.from_json(metadata[CONFIG_METADATA_KEY])
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}: bad {CONFIG_METADATA_KEY!r} metadata: {exc}") from exc
        else:
            config = _infer_config(path, shapes)

        with torch.random.fork_rng(devices=[]):
            unet_module = build_unet(config, device="meta").to(dtype)
            if unet:
                unet_module = unet_module.to_empty(device=device)
            text_encoder = build_text_encoder(config, device="meta").to(dtype).to_empty(device=device)
        expected_unet = {k: v.shape for k, v in unet_module.state_dict().items()}
        _load_into(path, unet_module, expected_unet, canon, shapes, handle, UNET_PREFIX, "UNet", read=unet)
        expected_text = _expected_text_keys(text_encoder)
        _load_into(path, text_encoder, expected_text, canon, shapes, handle, TEXT_PREFIX, "text encoder")

        alphas = sd1_alphas_cumprod()
        if "alphas_cumprod" in shapes and shapes["alphas_cumprod"] == [1000]:
            alphas = handle.read(canon["alphas_cumprod"], torch.float32)

    # to_empty left the position_ids buffer uninitialised; it is always 0..n-1.
    embeddings = text_encoder.text_model.embeddings
    if hasattr(embeddings, "position_ids"):
        with torch.no_grad():
            ids = torch.arange(config.max_positions, device=device).expand(1, -1)
            embeddings.position_ids.copy_(ids.to(embeddings.position_ids.dtype))
    return SD1Model(
        unet=unet_module.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=load_clip_tokenizer(),
        alphas_cumprod=alphas.to(device),
        config=config,
    )
