"""Prompts -> UNet conditioning, with layer-wise concept binding (ED-LoRA).

A prompt that mentions concept tokens is encoded once per cross-attention layer: in copy l every
user token's input embedding is that token's layer-l row. The result is one context per attn2
layer, [B, L, 77, D]; attn2 layer l attends to slice l. A prompt with no concept tokens costs one
encoder pass and is expanded (a view, no copy) to all layers.

This module serves the demo, the CLI, fusion and tests (one 77-token chunk, like SD1's own
pipeline). Inside the WebUI the host's own prompt encoding is reused instead (chunks, emphasis,
BREAK) with the same rows registered as temporary embeddings: see `scripts/`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lib_mos.concepts.concept import Concept, ConceptError
from lib_mos.models.family import ModelFamily
from lib_mos.models.sd1 import SD1Model

CHUNK_TOKENS = 75


def tokenize(model: SD1Model, prompts: list[str]) -> torch.Tensor:
    """Token ids [B, 77]; a prompt longer than 75 tokens is an error, not silently truncated."""
    return torch.tensor([_chunk(model, _ids(model, p), p) for p in prompts], dtype=torch.long)


def _ids(model: SD1Model, text: str) -> list[int]:
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer (meta skeleton?)")
    return model.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"] if text else []


def _chunk(model: SD1Model, ids: list[int], prompt: str) -> list[int]:
    tok = model.tokenizer
    if len(ids) > CHUNK_TOKENS:
        raise ValueError(f"prompt has {len(ids)} tokens, more than {CHUNK_TOKENS}: {prompt[:60]!r}...")
    return [tok.bos_token_id, *ids] + [tok.eos_token_id] * (CHUNK_TOKENS + 1 - len(ids))


@torch.no_grad()
def encode_prompts(model: SD1Model, prompts: list[str]) -> torch.Tensor:
    """Plain encoding (no concept tokens): last hidden state of the text encoder, [B, 77, D]."""
    ids = tokenize(model, prompts).to(next(model.text_encoder.parameters()).device)
    return model.text_encoder(input_ids=ids).last_hidden_state


@contextmanager
def _rows_injected(text_encoder: nn.Module, mask: torch.Tensor, rows: torch.Tensor):
    """While active, the token embedding returns `rows` at the positions where `mask` is True
    (per instance; removed in `finally`)."""
    emb = text_encoder.get_input_embeddings()

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        out = type(emb).forward(emb, input_ids)
        return out.masked_scatter(mask.unsqueeze(-1).to(out.device), rows.to(out.dtype))

    emb.forward = forward
    try:
        yield
    finally:
        del emb.forward


class PromptBinder:
    """Binds prompts for one set of concepts; encodings are cached for the binder's lifetime (make
    one per generation). Without a model (the host encodes) `family` says how many layers a prompt
    without concept tokens spans."""

    def __init__(self, model: SD1Model | None, concepts: Sequence[Concept] = (),
                 family: ModelFamily | None = None) -> None:
        self.model = model
        self.concepts = tuple(concepts)
        family = family or (model.family if model is not None else None)
        if family is None:
            raise ValueError("PromptBinder needs a model or a model family")
        self.rows: dict[str, torch.Tensor] = {}
        for c in concepts:
            for token in c.tokens:
                if token in self.rows:
                    raise ConceptError(f"token {token!r} is defined by more than one concept")
                self.rows[token] = c.token_rows(token)
        layers = {r.shape[0] for r in self.rows.values()}
        if len(layers) > 1:
            raise ConceptError(f"concepts have different layer counts: {sorted(layers)}")
        self.layers = layers.pop() if layers else family.layers
        if self.layers != family.layers:
            raise ConceptError(f"concepts have {self.layers} embedding rows per token; the {family.label} model has "
                               f"{family.layers} cross-attention layers")
        names = sorted(self.rows, key=len, reverse=True)  # longest first: no prefix captures a longer token
        self._pattern = re.compile("|".join(map(re.escape, names))) if names else None
        self._cache: dict[str, torch.Tensor] = {}

    def concept_tokens_in(self, prompt: str) -> list[str]:
        return self._pattern.findall(prompt) if self._pattern else []

    def tokenize_bound(self, prompt: str) -> tuple[list[int], list[tuple[int, str]]]:
        """Ids with one placeholder position per concept token, and (position, token) slots."""
        ids: list[int] = []
        slots: list[tuple[int, str]] = []
        last = 0
        for m in self._pattern.finditer(prompt) if self._pattern else ():
            ids += _ids(self.model, prompt[last:m.start()])
            slots.append((len(ids) + 1, m.group(0)))  # +1: BOS comes first
            ids.append(self.model.tokenizer.unk_token_id)
            last = m.end()
        ids += _ids(self.model, prompt[last:])
        return _chunk(self.model, ids, prompt), slots

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, L, 77, D]: layer l of a prompt with concept tokens has their layer-l rows injected."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        plain = [p for p in todo if not self.concept_tokens_in(p)]
        bound = [p for p in todo if p not in plain]
        device = next(self.model.text_encoder.parameters()).device
        if plain:
            for p, z in zip(plain, encode_prompts(self.model, plain)):
                self._cache[p] = z.unsqueeze(0).expand(self.layers, -1, -1)
        if bound:
            L = self.layers
            tokenized = [self.tokenize_bound(p) for p in bound]
            ids = torch.tensor([t[0] for t in tokenized], dtype=torch.long, device=device)
            ids = ids.repeat_interleave(L, dim=0)  # row b*L + l: prompt b, layer l
            mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
            rows = []
            for b, (_, slots) in enumerate(tokenized):
                for layer in range(L):
                    # slots are in position order, the order in which masked_scatter fills
                    mask[b * L + layer, [pos for pos, _ in slots]] = True
                    rows += [self.rows[token][layer] for _, token in slots]
            with _rows_injected(self.model.text_encoder, mask, torch.stack(rows)):
                z = self.model.text_encoder(input_ids=ids).last_hidden_state
            for b, p in enumerate(bound):
                self._cache[p] = z[b * L:(b + 1) * L]
        return torch.stack([self._cache[p] for p in prompts])


def bind_prompts(model: SD1Model, prompts: Sequence[str], concepts: Sequence[Concept] = ()) -> torch.Tensor:
    """One-shot `PromptBinder(model, concepts).encode(prompts)`."""
    return PromptBinder(model, concepts).encode(prompts)


def _letters(n: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'ba': digits-free, so BPE never merges it with a neighbour number."""
    out = ""
    while True:
        out = chr(ord("a") + n % 26) + out
        n //= 26
        if n == 0:
            return out


def alias(layer: int, token_index: int) -> str:
    """A one-word stand-in for (layer, concept token) that no real prompt contains."""
    return f"mosbind{_letters(layer)}x{_letters(token_index)}"


def aliased_prompts(binder: PromptBinder, prompts: Sequence[str]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """For a host that inserts embeddings by name (A1111's textual inversion): the prompts with
    every concept token replaced by its per-layer alias, ordered prompt-major ([b * L + l]), and
    alias -> the [D] row to register under that name. Prompts without concept tokens appear once
    per layer too, so the result always reshapes to [B, L, ...]."""
    index = {token: i for i, token in enumerate(binder.rows)}
    rows: dict[str, torch.Tensor] = {}
    out = []
    for prompt in prompts:
        used = binder.concept_tokens_in(prompt)
        for layer in range(binder.layers):
            if not used:
                out.append(prompt)
                continue
            for token in used:
                rows[alias(layer, index[token])] = binder.rows[token][layer]
            out.append(binder._pattern.sub(lambda m, layer=layer: alias(layer, index[m.group(0)]), prompt))
    return out, rows
