"""Host row: Haoming02's Forge Classic (`ldm_patched`, gradio 3.41). Every function here has a
namesake in `mos_host_a1111`; `mos_host` picks the row of the running host.

Forge Classic keeps A1111's model object and text stack (`sd_model.model.diffusion_model` is
`ldm_patched`'s UNet with ldm's module names; prompts go through A1111's hijacked CLIP and its
`model_hijack.embedding_db`, reloaded per generation), so most functions are A1111's; its sampler
is Forge's (chunks, uncond first, `transformer_options["cond_or_uncond"]` on every UNet call), so
the call rows are Forge's; and its SDXL text encoders are both transformers models. docs/forge.md
says what was read and seen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lib_mos.files import import_sibling
from lib_mos.models.family import SD1, ModelFamily

a1111 = import_sibling(__file__, "mos_host_a1111")
forge = import_sibling(__file__, "mos_host_forge")

AND_PARTS_APART = forge.AND_PARTS_APART
"""Whether a UNet call tells the rows of each AND part of the prompt apart: not here (Forge's sampler)."""


def unet_of(sd_model) -> nn.Module:
    return a1111.unet_of(sd_model)


def embedding_names(sd_model) -> set[str]:
    return a1111.embedding_names(sd_model)


def embedding_widths(sd_model, family: ModelFamily) -> list[int]:
    return a1111.embedding_widths(sd_model, family)


def alias_embeddings(sd_model, vectors: dict[str, torch.Tensor | dict[str, torch.Tensor]]):
    return a1111.alias_embeddings(sd_model, vectors)


def empty_prompt(sd_model) -> torch.Tensor:
    return a1111.empty_prompt(sd_model)


def text_encoders(sd_model, family: ModelFamily) -> tuple[dict[str, nn.Module], nn.Module | None]:
    """SD1 as A1111; SDXL's CLIP-L as "0." and bigG as "1.", both transformers models here
    (Forge's CLIP put into A1111's embedders), so no fused q/k/v."""
    if family is SD1:
        return a1111.text_encoders(sd_model, family)
    embedders = sd_model.conditioner.embedders
    return {"0.": embedders[0].wrapped.transformer, "1.": embedders[1].wrapped.transformer}, None


def call_rows(unet: nn.Module, begin_call: Callable[[torch.Tensor], None], counts: Callable[[], tuple[int, int]]):
    return forge.call_rows(unet, begin_call, counts)
