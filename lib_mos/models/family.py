"""Model families as rows of one table: everything the rest of the code may know about SD1 or SDXL.

A feature never tests "is this SDXL?"; it asks the family for the fact it needs: the UNet's
cross-attention layers in order and the UNet level each sits at, the text encoders (their width,
checkpoint prefix, LoRA key prefixes and textual-inversion key), the checkpoint prefixes, the
shape of the conditioning the UNet is called with, and how LoRA metadata names the family. Adding
a family is adding a row (`FAMILIES`), not a fork.

Attn2 order is the order in which one UNet forward calls the layers (the order of
`named_modules()`): input blocks, middle block, output blocks, and inside each spatial transformer
its transformer_blocks 0, 1, ... .
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "FAMILIES",
    "SD1",
    "SDXL",
    "ModelFamily",
    "TextEncoderSpec",
    "attn2_modules",
    "attn2_names",
    "family_named",
    "family_of_lora_metadata",
    "family_of_unet",
]


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family, as the host and LoRA files name it."""

    key: str  # the host's textual-inversion key ("clip_l", "clip_g")
    width: int  # hidden size; its share of the UNet's context
    checkpoint_prefix: str  # where its weights sit in a host-layout checkpoint
    lora_prefix: str  # kohya's key prefix for its layers
    layers: int  # transformer layers of the full-size encoder
    root: str  # prefix of its module names in the model's text root ("" or "0.", "1.")


def attn2_names(depths: Iterable[tuple[str, int]]) -> tuple[str, ...]:
    """attn2 module names of spatial transformers `(block path, depth)`, in call order."""
    return tuple(f"{block}.1.transformer_blocks.{i}.attn2" for block, depth in depths for i in range(depth))


@dataclass(frozen=True)
class ModelFamily:
    """Everything family-specific that the features read (see the module docstring)."""

    name: str  # "sd1", "sdxl": the word used in files, metadata and messages
    label: str  # what a user calls it
    attn2: tuple[str, ...]  # cross-attention module names in call order
    attn2_levels: tuple[int, ...]  # UNet level (number of halvings) of each attn2 layer
    channel_mult: tuple[int, ...]  # width of each UNet level in units of model_channels
    context_dim: int  # width of the cross-attention context (the encoders' widths concatenated)
    text_encoders: tuple[TextEncoderSpec, ...]
    unet_prefix: str  # the UNet's prefix in a host-layout checkpoint
    vector_dim: int | None  # the UNet's pooled/size vector `y` (SDXL), None when it has none
    pooled_encoder: str | None  # key of the text encoder whose pooled output is part of `y`
    lora_versions: tuple[str, ...]  # prefixes of kohya's `ss_base_model_version` for this family
    lora_version_written: str  # what our writer puts there (the host's Lora list filters by it)
    latent_scale: float  # the VAE's latents times this are the UNet's space (the config's scale_factor)

    def __post_init__(self) -> None:
        if len(self.attn2) != len(self.attn2_levels):
            raise ValueError(f"{self.name}: {len(self.attn2)} attn2 names but {len(self.attn2_levels)} levels")
        if sum(t.width for t in self.text_encoders) != self.context_dim:
            raise ValueError(f"{self.name}: text encoder widths do not add up to context_dim {self.context_dim}")

    @property
    def layers(self) -> int:
        """Number of cross-attention layers: embedding rows per ED-LoRA token."""
        return len(self.attn2)

    @property
    def dict_conditioning(self) -> bool:
        """The UNet is called with `{"crossattn": [B, T, D], "vector": [B, V]}`, not a tensor."""
        return self.vector_dim is not None

    def text_encoder_modules(self, text_root: torch.nn.Module) -> list[torch.nn.Module]:
        """Each text encoder of a model's text root, in the family's order (a root "" is the root)."""
        return [text_root.get_submodule(t.root.rstrip(".")) if t.root else text_root for t in self.text_encoders]

    @property
    def pooled_root(self) -> str | None:
        """Text-root prefix of the encoder giving the pooled vector (a LoRA changes `y` only there)."""
        return next((t.root for t in self.text_encoders if t.key == self.pooled_encoder), None)

    def crossattn(self, cond: Any) -> torch.Tensor:
        """The cross-attention context of a conditioning as the host passes it (tensor or dict)."""
        if isinstance(cond, Mapping):
            return cond["crossattn"]
        return cond

    def level_sizes(self, width: int, height: int, factor: int = 8) -> list[tuple[int, int]]:
        """(h, w) of the UNet's feature maps at each level for an image of width x height pixels:
        the latent is H/8 x W/8 and every down level halves with ceil (stride-2 conv, padding 1);
        up levels come back to the same sizes (the host resizes skip connections to fit)."""
        h, w = -(-height // factor), -(-width // factor)
        levels = [(h, w)]
        for _ in range(len(self.channel_mult) - 1):
            h, w = (h + 1) // 2, (w + 1) // 2
            levels.append((h, w))
        return levels

    def attention_sizes(self, width: int, height: int, factor: int = 8) -> list[tuple[int, int]]:
        """(h, w) of the feature map each attn2 layer sees, in the family's order."""
        levels = self.level_sizes(width, height, factor)
        return [levels[level] for level in self.attn2_levels]


_SD1_INPUT_ATTN = (1, 2, 4, 5, 7, 8)
SD1 = ModelFamily(
    name="sd1",
    label="SD1.x",
    attn2=attn2_names([*((f"input_blocks.{i}", 1) for i in _SD1_INPUT_ATTN), ("middle_block", 1),
                       *((f"output_blocks.{i}", 1) for i in range(3, 12))]),
    attn2_levels=(0, 0, 1, 1, 2, 2, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0),
    channel_mult=(1, 2, 4, 4),
    context_dim=768,
    text_encoders=(TextEncoderSpec("clip_l", 768, "cond_stage_model.transformer.", "lora_te_", 12, ""),),
    unet_prefix="model.diffusion_model.",
    vector_dim=None,
    pooled_encoder=None,
    lora_versions=("sd_v1", "sd_1"),
    lora_version_written="sd_v1",
    latent_scale=0.18215,  # v1-inference.yaml
)

# sd_xl_base.yaml: channel_mult (1, 2, 4), attention at levels 1 and 2 with transformer depth 2
# and 10 (middle block 10): input blocks 4, 5 / 7, 8, the middle block, output blocks 0-2 / 3-5.
SDXL = ModelFamily(
    name="sdxl",
    label="SDXL",
    attn2=attn2_names([("input_blocks.4", 2), ("input_blocks.5", 2), ("input_blocks.7", 10),
                       ("input_blocks.8", 10), ("middle_block", 10),
                       *((f"output_blocks.{i}", 10) for i in range(3)),
                       *((f"output_blocks.{i}", 2) for i in range(3, 6))]),
    attn2_levels=(1,) * 4 + (2,) * 20 + (2,) * 10 + (2,) * 30 + (1,) * 6,
    channel_mult=(1, 2, 4),
    context_dim=2048,
    text_encoders=(
        TextEncoderSpec("clip_l", 768, "conditioner.embedders.0.transformer.", "lora_te1_", 12, "0."),
        TextEncoderSpec("clip_g", 1280, "conditioner.embedders.1.model.", "lora_te2_", 32, "1."),
    ),
    unet_prefix="model.diffusion_model.",
    vector_dim=2816,  # pooled bigG 1280 + 6 size numbers x 256 Fourier features
    pooled_encoder="clip_g",
    lora_versions=("sdxl",),
    lora_version_written="sdxl_base_v1-0",
    latent_scale=0.13025,  # sd_xl_base.yaml
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD1, SDXL)}


def family_named(name: str) -> ModelFamily:
    """The family called `name` ("sd1", "sdxl"); anything else is an error listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of_unet(unet: torch.nn.Module) -> ModelFamily:
    """The family whose attn2 layers the UNet has, exactly; anything else is an error naming what
    was found, so a UNet we do not know is never driven with another family's layer list."""
    found = {name for name, _ in unet.named_modules() if name.rsplit(".", 1)[-1] == "attn2"}
    for family in FAMILIES.values():
        if found == set(family.attn2):
            return family
    raise ValueError(f"unknown UNet: {len(found)} attn2 layers match neither "
                     + " nor ".join(f"{f.label} ({f.layers})" for f in FAMILIES.values()))


def attn2_modules(unet: torch.nn.Module, family: ModelFamily | None = None) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's cross-attention modules in its family's order (`family` None: found from the
    UNet; given: the UNet must be of it).

    Duck-typed (heads, to_q/to_k/to_v/to_out) rather than isinstance, because hosts swap or
    subclass the attention class for their optimisations (ldm's and sgm's alike).
    """
    found = {name: mod for name, mod in unet.named_modules() if name.rsplit(".", 1)[-1] == "attn2"}
    if family is None:
        family = family_of_unet(unet)
    elif set(found) != set(family.attn2):
        missing = sorted(set(family.attn2) - set(found))
        extra = sorted(set(found) - set(family.attn2))
        raise ValueError(f"not an {family.label} UNet: expected the {family.layers} attn2 modules of {family.label} "
                         f"(found {len(found)}; missing {missing[:3]}, unexpected {extra[:3]})")
    out = []
    for name in family.attn2:
        mod = found[name]
        if not all(hasattr(mod, attr) for attr in ("heads", "to_q", "to_k", "to_v", "to_out")):
            raise ValueError(f"{name} is a {type(mod).__name__}, not a CrossAttention-like module")
        out.append((name, mod))
    return out


def family_of_lora_metadata(metadata: Mapping[str, str]) -> str | None:
    """What a LoRA's kohya metadata says it was trained for: a family name, "sd2", or None."""
    version = str(metadata.get("ss_base_model_version", "")).lower()
    if str(metadata.get("ss_v2", "")) == "True" or version.startswith("sd_v2"):
        return "sd2"
    for family in FAMILIES.values():
        if any(version.startswith(v) for v in family.lora_versions):
            return family.name
    return None
