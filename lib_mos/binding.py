"""Prompts -> UNet conditioning outside the host (demo, CLI, tests).

SD1 encodes 77 tokens: BOS, up to 75 prompt tokens, EOS, then EOS padding (SD1's pad id is EOS),
as the host does for a prompt that fits one chunk.
"""

from __future__ import annotations

import torch

from lib_mos.sd1 import SD1Model

CHUNK_TOKENS = 75


def tokenize(model: SD1Model, prompts: list[str]) -> torch.Tensor:
    """Token ids [B, 77]; a prompt longer than 75 tokens is an error, not silently truncated."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer (meta skeleton?)")
    tok = model.tokenizer
    rows = []
    for prompt in prompts:
        ids = tok(prompt, add_special_tokens=False, truncation=False)["input_ids"]
        if len(ids) > CHUNK_TOKENS:
            raise ValueError(f"prompt has {len(ids)} tokens, more than {CHUNK_TOKENS}: {prompt[:60]!r}...")
        rows.append([tok.bos_token_id, *ids] + [tok.eos_token_id] * (CHUNK_TOKENS + 1 - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def encode_prompts(model: SD1Model, prompts: list[str]) -> torch.Tensor:
    """Last hidden state of the text encoder, [B, 77, D]."""
    ids = tokenize(model, prompts).to(next(model.text_encoder.parameters()).device)
    return model.text_encoder(input_ids=ids).last_hidden_state
