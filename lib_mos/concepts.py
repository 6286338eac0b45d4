"""ED-LoRA concepts: the in-memory model, diffusers <-> host (ldm) module names, and applying a
concept's LoRA to a live model with bit-exact removal.

A concept is a few user tokens, each with one embedding row per UNet cross-attention layer
([L, D], L = 16 for SD1 in the order of `sd1.ATTN2_NAMES`), plus low-rank weight updates
(delta W = scale * up @ down) on text-encoder and UNet linears. Module names are the host's:
ldm names for the UNet (relative to `diffusion_model`), transformers names for the text encoder
(relative to the CLIPTextModel) — the same names the live model and its checkpoint use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


class ConceptError(ValueError):
    """A concept file or concept set is unusable; the message names the file and the key."""


@dataclass(frozen=True)
class LoraFactor:
    """delta W = scale * up @ down, with down [rank, in] and up [out, rank]."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.up.to(dtype) @ self.down.to(dtype)) * self.scale


@dataclass
class Concept:
    """One concept as loaded from a file (see `lib_mos.concept_files`)."""

    name: str
    tokens: tuple[str, ...]
    embeddings: torch.Tensor  # [n_tokens, L, D]
    unet_lora: dict[str, LoraFactor] = field(default_factory=dict)
    text_lora: dict[str, LoraFactor] = field(default_factory=dict)
    class_word: str | None = None
    base_model_hash: str | None = None
    source_path: str | None = None
    source_sha256: str | None = None

    @property
    def layers(self) -> int:
        return self.embeddings.shape[1]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[2]

    @property
    def rank(self) -> int | None:
        ranks = {f.rank for f in (*self.unet_lora.values(), *self.text_lora.values())}
        return ranks.pop() if len(ranks) == 1 else None

    def token_rows(self, token: str) -> torch.Tensor:
        """The [L, D] rows of one user token."""
        return self.embeddings[self.tokens.index(token)]


# ------------------------------------------------------------------------------------ name mapping
# SD1 diffusers UNet blocks -> ldm blocks: down_blocks.i.attentions.j -> input_blocks.(3i+j+1).1,
# mid_block.attentions.0 -> middle_block.1, up_blocks.i.attentions.j -> output_blocks.(3i+j).1
# (up_blocks.0 has no attention in SD1). Inside a transformer block the names are equal.
_DOWN = re.compile(r"^down_blocks\.(\d)\.attentions\.(\d)\.(.+)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")
_UP = re.compile(r"^up_blocks\.(\d)\.attentions\.(\d)\.(.+)$")
_IN = re.compile(r"^input_blocks\.(\d+)\.1\.(.+)$")
_MIDL = re.compile(r"^middle_block\.1\.(.+)$")
_OUT = re.compile(r"^output_blocks\.(\d+)\.1\.(.+)$")


def unet_diffusers_to_ldm(name: str) -> str:
    """`down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q` ->
    `input_blocks.2.1.transformer_blocks.0.attn1.to_q`; KeyError for a name outside the SD1 blocks."""
    if m := _DOWN.match(name):
        i, j = int(m[1]), int(m[2])
        if i < 3 and j < 2:
            return f"input_blocks.{3 * i + j + 1}.1.{m[3]}"
    elif m := _MID.match(name):
        return f"middle_block.1.{m[1]}"
    elif m := _UP.match(name):
        i, j = int(m[1]), int(m[2])
        if 1 <= i <= 3 and j < 3:
            return f"output_blocks.{3 * i + j}.1.{m[3]}"
    raise KeyError(f"not an SD1 UNet attention-block module: {name}")


def unet_ldm_to_diffusers(name: str) -> str:
    """Inverse of `unet_diffusers_to_ldm`."""
    if m := _IN.match(name):
        n = int(m[1])
        if n in (1, 2, 4, 5, 7, 8):
            return f"down_blocks.{(n - 1) // 3}.attentions.{(n - 1) % 3}.{m[2]}"
    elif m := _MIDL.match(name):
        return f"mid_block.attentions.0.{m[1]}"
    elif m := _OUT.match(name):
        n = int(m[1])
        if 3 <= n <= 11:
            return f"up_blocks.{n // 3}.attentions.{n % 3}.{m[2]}"
    raise KeyError(f"not an SD1 UNet attention-block module: {name}")


# ------------------------------------------------------------------------------------ live models
def _linear(root: nn.Module, name: str, what: str) -> nn.Linear:
    try:
        module = root.get_submodule(name)
    except AttributeError as e:
        raise ConceptError(f"{what}: no module {name!r} in the model") from e
    if not isinstance(module, nn.Linear):
        raise ConceptError(f"{what}: {name!r} is a {type(module).__name__}, not a Linear")
    return module


def check_fits(concept: Concept, unet: nn.Module, text_encoder: nn.Module) -> None:
    """Every LoRA target exists with matching shapes and the embedding width is the text width."""
    what = concept.source_path or concept.name
    width = text_encoder.get_input_embeddings().weight.shape[1]
    if concept.dim != width:
        raise ConceptError(f"{what}: embeddings are {concept.dim} wide but the model's text encoder is {width} "
                           "(a concept for another model family?)")
    for root, lora in ((unet, concept.unet_lora), (text_encoder, concept.text_lora)):
        for name, f in lora.items():
            lin = _linear(root, name, what)
            if tuple(f.down.shape) != (f.rank, lin.in_features) or tuple(f.up.shape) != (lin.out_features, f.rank):
                raise ConceptError(
                    f"{what}: LoRA {name!r} is {tuple(f.up.shape)} x {tuple(f.down.shape)}, the model's layer is "
                    f"{lin.out_features} x {lin.in_features} (a concept for another model family?)")


@contextmanager
def applied(concepts: Iterable[tuple[Concept, float, float]], unet: nn.Module,
            text_encoder: nn.Module) -> Iterator[None]:
    """Add each (concept, unet weight, text weight)'s LoRA to the live weights for the duration of
    the block; afterwards every touched weight is the saved original tensor, bit for bit."""
    items = list(concepts)
    for concept, _, _ in items:
        check_fits(concept, unet, text_encoder)
    saved: dict[int, tuple[nn.Linear, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for concept, unet_weight, text_weight in items:
                for root, lora, w in ((unet, concept.unet_lora, unet_weight), (text_encoder, concept.text_lora, text_weight)):
                    if w == 0:
                        continue
                    for name, f in lora.items():
                        lin = root.get_submodule(name)
                        if id(lin) not in saved:
                            saved[id(lin)] = (lin, lin.weight.data)
                            lin.weight.data = lin.weight.data.clone()
                        delta = f.delta(torch.float32).to(lin.weight.device) * w
                        lin.weight.data += delta.to(lin.weight.dtype)
        yield
    finally:
        for lin, original in saved.values():
            lin.weight.data = original
