"""Host glue: layer-wise concept binding through the WebUI's own prompt encoder.

The host encodes prompts with chunks beyond 75 tokens, emphasis and BREAK; its textual-inversion
machinery replaces input-embedding rows at token positions, which is one layer's worth of
ED-LoRA binding. Each (layer, concept token) row is registered as a temporary one-vector
embedding under an alias name, all layer copies are encoded in one batched call, and the aliases
are unregistered in `finally`.

Must run inside the generation (the host reloads embeddings at the start of `process_images`).
"""

from __future__ import annotations

import torch

from lib_mos.binding import PromptBinder, aliased_prompts


def encode_bound(sd_model, embedding_db, binder: PromptBinder, prompts: list[str]) -> torch.Tensor:
    """[B, L, T, D] layer-wise contexts of `prompts`, T a multiple of 77 as the host makes it.

    As in the host for a batch, emphasis's mean restore is computed over the batch it encodes,
    here all L copies of a prompt together."""
    from modules.textual_inversion.textual_inversion import Embedding

    texts, rows = aliased_prompts(binder, prompts)
    registered = []
    try:
        for name, row in rows.items():
            e = Embedding(row.unsqueeze(0), name)
            e.vectors, e.shape = 1, row.shape[-1]  # the host's Embedding starts with vectors = 0
            embedding_db.register_embedding(e, sd_model)
            registered.append(name)
        with torch.no_grad():
            z = torch.cat([sd_model.get_learned_conditioning(texts[i:i + binder.layers])
                           for i in range(0, len(texts), binder.layers)])
    finally:
        for name in registered:
            embedding_db.register_embedding_by_name(None, sd_model, name)
    return z.reshape(len(prompts), binder.layers, *z.shape[1:])
