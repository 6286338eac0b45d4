"""Host row: AUTOMATIC1111 WebUI v1.10.1 (ldm / sgm models). Every function here has a namesake in
`mos_host_forge`; `mos_host` picks the row of the running host (docs/host.md says what each reads).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from lib_mos.models.family import SD1, ModelFamily

AND_PARTS_APART = True
"""Whether a UNet call tells the rows of each AND part of the prompt apart: here every part has
its own cond rows, in order."""


def unet_of(sd_model) -> nn.Module:
    """ldm's `UNetModel` inside the model's wrapper."""
    return sd_model.model.diffusion_model


def embedding_names(sd_model) -> set[str]:
    """Names of the textual-inversion embeddings the prompt encoder knows now."""
    from modules.sd_hijack import model_hijack

    return set(model_hijack.embedding_db.word_embeddings)


def embedding_widths(sd_model, family: ModelFamily) -> list[int]:
    """Each text encoder's embedding width, in the family's order, read as the host reads an
    embedding's expected shape."""
    if len(family.text_encoders) == 1:
        return [sd_model.cond_stage_model.encode_embedding_init_text(",", 1).shape[1]]
    embedders = sd_model.conditioner.embedders[:len(family.text_encoders)]  # then SDXL's size embedders
    return [embedder.encode_embedding_init_text(",", 1).shape[1] for embedder in embedders]


@contextmanager
def alias_embeddings(sd_model, vectors: dict[str, torch.Tensor | dict[str, torch.Tensor]]) -> Iterator[None]:
    """One-vector textual-inversion embeddings registered under the given names for the block (a
    dict vector: one per encoder key, as SDXL embedding files hold them), removed in `finally`."""
    from modules import devices
    from modules.sd_hijack import model_hijack
    from modules.textual_inversion.textual_inversion import Embedding

    db = model_hijack.embedding_db
    registered = []
    try:
        for name, vec in vectors.items():
            # where and how the host keeps embeddings loaded from files: on its device, in float32
            vec = {k: v.to(devices.device, torch.float32) for k, v in vec.items()} if isinstance(vec, dict) \
                else vec.to(devices.device, torch.float32)
            e = Embedding(vec, name)
            e.vectors, e.shape = 1, sum(v.shape[-1] for v in vec.values()) if isinstance(vec, dict) else vec.shape[-1]
            db.register_embedding(e, sd_model)  # the host's Embedding starts with vectors = 0
            registered.append(name)
        yield
    finally:
        for name in registered:
            db.register_embedding_by_name(None, sd_model, name)


def empty_prompt(sd_model) -> torch.Tensor:
    """[77, D]: the empty prompt's cross-attention context, with which the host pads a shorter
    prompt's conditioning to a longer one's token count (`pad_cond_uncond`)."""
    return sd_model.cond_stage_model_empty_prompt[0]


def text_encoders(sd_model, family: ModelFamily) -> tuple[dict[str, nn.Module], nn.Module | None]:
    """(the transformers CLIP text models by the core's text root, OpenCLIP bigG's text transformer
    or None): SD1's one CLIP; SDXL's CLIP-L as "0." and bigG, which is OpenCLIP's here."""
    if family is SD1:
        return {"": sd_model.cond_stage_model.wrapped.transformer}, None
    embedders = sd_model.conditioner.embedders
    return {"0.": embedders[0].wrapped.transformer}, embedders[1].wrapped.model


def call_rows(unet: nn.Module, begin_call: Callable[[torch.Tensor], None],
              counts: Callable[[], tuple[int, int]]):
    """Every UNet call takes the next rows of the step in order (all cond, then all uncond), which
    `SteppedRegionalContext` follows by itself: nothing to name."""
    return nullcontext()
