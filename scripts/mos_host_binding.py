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


def encode_bound(sd_model, embedding_db, binder: PromptBinder, prompts: list[str],
                 cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[B, L, T, D] layer-wise contexts of `prompts`, T a multiple of 77 as the host makes it.

    `cache` (prompt -> [L, T, D]) lets one generation encode each prompt once. As in the host for
    a batch, emphasis's mean restore is computed over the batch it encodes, here all L copies of a
    prompt together."""
    from modules.textual_inversion.textual_inversion import Embedding

    cache = {} if cache is None else cache
    todo = [p for p in dict.fromkeys(prompts) if p not in cache]
    plain = [p for p in todo if not binder.concept_tokens_in(p)]
    bound = [p for p in todo if p not in plain]
    if plain:  # no concept tokens: one pass, the same context for every layer
        with torch.no_grad():
            z = sd_model.get_learned_conditioning(plain)
        for p, zp in zip(plain, z):
            cache[p] = zp.unsqueeze(0).expand(binder.layers, -1, -1)
    texts, rows = aliased_prompts(binder, bound)
    registered = []
    try:
        for name, row in rows.items():
            e = Embedding(row.unsqueeze(0), name)
            e.vectors, e.shape = 1, row.shape[-1]  # the host's Embedding starts with vectors = 0
            embedding_db.register_embedding(e, sd_model)
            registered.append(name)
        with torch.no_grad():
            for k, prompt in enumerate(bound):
                cache[prompt] = sd_model.get_learned_conditioning(texts[k * binder.layers:(k + 1) * binder.layers])
    finally:
        for name in registered:
            embedding_db.register_embedding_by_name(None, sd_model, name)
    return torch.stack([cache[p] for p in prompts])
