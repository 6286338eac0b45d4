"""Prompts -> UNet conditioning, with layer-wise concept binding (ED-LoRA).

A prompt that mentions concept tokens is encoded once per cross-attention layer: in copy l every
user token's input embedding is that token's layer-l row. The result is one context per attn2
layer, [B, L, 77, D]; attn2 layer l attends to slice l. A prompt with no concept tokens costs one
encoder pass and is expanded (a view, no copy) to all layers.

SDXL has two text encoders whose outputs are concatenated into the context, so a row is the
concatenation too: its first part is CLIP-L's input embedding, the rest OpenCLIP bigG's (the
widths of the family's `text_encoders`, in order). The UNet also takes one pooled vector per
picture, from bigG's end-of-text output, where the concept gives L encodings: the vector is the
mean of the L pooled outputs, so every layer's rows count alike, and rows equal at every layer
give textual inversion's vector exactly.

This module serves the demo, the CLI, fusion and tests (one 77-token chunk, like SD1's own
pipeline). Inside the WebUI the host's own prompt encoding is reused instead (chunks, emphasis,
BREAK) with the same rows registered as temporary embeddings: see `scripts/`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from lib_mos.concepts.concept import Concept, ConceptError, input_embedding_table, text_width
from lib_mos.models.family import ModelFamily
from lib_mos.models.sd1 import SD1Model

if TYPE_CHECKING:
    from lib_mos.models.sdxl import SDXLModel

CHUNK_TOKENS = 75
ENCODE_BATCH = 32  # layer copies through the text encoders at once (`PromptBinder._encode_bound`)


def tokenize(model: SD1Model | SDXLModel, prompts: list[str]) -> torch.Tensor:
    """Token ids [B, 77]; a prompt longer than 75 tokens is an error, not silently truncated."""
    return torch.tensor([_chunk(model, _ids(model, p), p) for p in prompts], dtype=torch.long)


def _ids(model: SD1Model | SDXLModel, text: str) -> list[int]:
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer (meta skeleton?)")
    return model.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"] if text else []


def _chunk(model: SD1Model | SDXLModel, ids: list[int], prompt: str) -> list[int]:
    tok = model.tokenizer
    if len(ids) > CHUNK_TOKENS:
        raise ValueError(f"prompt has {len(ids)} tokens, more than {CHUNK_TOKENS}: {prompt[:60]!r}...")
    return [tok.bos_token_id, *ids] + [tok.eos_token_id] * (CHUNK_TOKENS + 1 - len(ids))


def text_encoder_parts(model: SD1Model | SDXLModel) -> list[tuple[nn.Module, slice]]:
    """Each text encoder of `model` in the family's order, with the slice of an embedding row (and
    of the context) it takes: SD1 its one encoder and the whole row; SDXL CLIP-L, then bigG."""
    out, start = [], 0
    for module in model.family.text_encoder_modules(model.text_root):
        width = input_embedding_table(module).shape[1]
        out.append((module, slice(start, start + width)))
        start += width
    return out


def encode_ids(model: SD1Model | SDXLModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context [B, 77, D], pooled [B, P] or None where the UNet takes no vector)."""
    if model.family.dict_conditioning:
        return model.encode_text(ids)
    return model.text_encoder(input_ids=ids).last_hidden_state, None


@torch.no_grad()
def encode_prompts(model: SD1Model | SDXLModel, prompts: list[str]) -> torch.Tensor:
    """Plain encoding (no concept tokens): the context the UNet attends to, [B, 77, D] (SD1: the
    encoder's last hidden state; SDXL: both encoders' penultimate ones)."""
    ids = tokenize(model, prompts).to(next(model.text_root.parameters()).device)
    return encode_ids(model, ids)[0]


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


@contextmanager
def rows_injected(model: SD1Model | SDXLModel, mask: torch.Tensor, rows: torch.Tensor):
    """`_rows_injected` into every text encoder of `model`, each with its part of the rows."""
    with ExitStack() as stack:
        for encoder, part in text_encoder_parts(model):
            stack.enter_context(_rows_injected(encoder, mask, rows[..., part]))
        yield


class PromptBinder:
    """Binds prompts for one set of concepts; encodings are cached for the binder's lifetime (make
    one per generation). Without a model (the host encodes) `family` says how many layers a prompt
    without concept tokens spans."""

    def __init__(self, model: SD1Model | SDXLModel | None, concepts: Sequence[Concept] = (),
                 family: ModelFamily | None = None) -> None:
        self.model = model
        self.concepts = tuple(concepts)
        family = family or (model.family if model is not None else None)
        if family is None:
            raise ValueError("PromptBinder needs a model or a model family")
        self.family = family
        self.rows: dict[str, torch.Tensor] = {}
        for c in concepts:
            if c.family is not family:
                raise ConceptError(f"{c.source_path or c.name}: concept {c.name!r} is for {c.family.label}; "
                                   f"this is an {family.label} model")
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
        if model is not None:
            width = text_width(model.text_root)
            for c in concepts:
                if c.tokens and c.dim != width:
                    raise ConceptError(f"{c.source_path or c.name}: concept {c.name!r} has embedding rows of width "
                                       f"{c.dim}; this model's text encoders take {width}")
        names = sorted(self.rows, key=len, reverse=True)  # longest first: no prefix captures a longer token
        self._pattern = re.compile("|".join(map(re.escape, names))) if names else None
        self._cache: dict[str, torch.Tensor] = {}
        self._pooled: dict[str, torch.Tensor] = {}

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
            # any id but end-of-text (CLIP's unknown token is that one): bigG's pooled output and its
            # zero padding are found at the first end-of-text; the row replaces the embedding anyway
            ids.append(self.model.tokenizer.bos_token_id)
            last = m.end()
        ids += _ids(self.model, prompt[last:])
        return _chunk(self.model, ids, prompt), slots

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, L, 77, D]: layer l of a prompt with concept tokens has their layer-l rows injected."""
        self._encode_missing(prompts)
        return torch.stack([self._cache[p] for p in prompts])

    @torch.no_grad()
    def pooled(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, P]: the pooled text each prompt gives the UNet's vector (SDXL; the mean over the
        layer copies of a prompt with concept tokens, see the module docstring)."""
        if not self.family.dict_conditioning:
            raise ValueError(f"the {self.family.label} UNet takes no pooled text")
        self._encode_missing(prompts)
        return torch.stack([self._pooled[p] for p in prompts])

    def conditioning(self, prompts: Sequence[str], width: int, height: int) -> torch.Tensor | dict[str, torch.Tensor]:
        """What the UNet is called with for `prompts` at a width x height picture: the layer-wise
        context, and for SDXL {"crossattn": it, "vector": [B, V]}."""
        context = self.encode(prompts)
        if not self.family.dict_conditioning:
            return context
        return {"crossattn": context, "vector": self.model.vector(self.pooled(prompts), width, height)}

    def _encode_missing(self, prompts: Sequence[str]) -> None:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        plain = [p for p in todo if not self.concept_tokens_in(p)]
        bound = [p for p in todo if p not in plain]
        device = next(self.model.text_root.parameters()).device
        if plain:
            context, pooled = encode_ids(self.model, tokenize(self.model, plain).to(device))
            for i, p in enumerate(plain):
                self._cache[p] = context[i].unsqueeze(0).expand(self.layers, -1, -1)
                if pooled is not None:
                    self._pooled[p] = pooled[i]
        if bound:
            context, pooled = self._encode_bound(bound)
            L = self.layers
            for b, p in enumerate(bound):
                self._cache[p] = context[b * L:(b + 1) * L]
                if pooled is not None:
                    self._pooled[p] = pooled[b * L:(b + 1) * L].mean(0)

    @torch.no_grad()
    def encode_to_eos(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, L, T, D] like `encode`, only up to the last prompt's end-of-text (T <= 77), uncached:
        the encoders are causal, so every position up to a prompt's EOS is exactly what `encode`
        gives, at a fraction of the cost (fusion records nothing after the EOS). Positions after a
        prompt's own EOS are not meaningful. A prompt without concept tokens is encoded once and
        expanded to the L layers, as in `encode`."""
        eos = self.model.tokenizer.eos_token_id
        length = max(self.tokenize_bound(p)[0].index(eos) for p in prompts) + 1
        plain = [p for p in dict.fromkeys(prompts) if not self.concept_tokens_in(p)]
        bound = [p for p in dict.fromkeys(prompts) if p not in plain]
        out: dict[str, torch.Tensor] = {}
        if plain:
            device = next(self.model.text_root.parameters()).device
            context = encode_ids(self.model, tokenize(self.model, plain)[:, :length].to(device))[0]
            out |= {p: context[i].unsqueeze(0).expand(self.layers, -1, -1) for i, p in enumerate(plain)}
        if bound:
            context = self._encode_bound(bound, length)[0]
            out |= {p: context[b * self.layers:(b + 1) * self.layers] for b, p in enumerate(bound)}
        return torch.stack([out[p] for p in prompts])

    def _encode_bound(self, prompts: list[str], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context [B * L, T, D], pooled [B * L, P] or None) of the layer copies of `prompts` (row
        b * L + l: prompt b, layer l), `ENCODE_BATCH` copies at a time so the encoders' activations
        stay small (SDXL keeps every layer's hidden state for the penultimate one); `length`: only
        the first positions (`encode_to_eos`)."""
        device = next(self.model.text_root.parameters()).device
        L = self.layers
        tokenized = [self.tokenize_bound(p) for p in prompts]
        ids = torch.tensor([t[0] for t in tokenized], dtype=torch.long, device=device)
        if length is not None:
            ids = ids[:, :length]
        ids = ids.repeat_interleave(L, dim=0)
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        rows = []
        for b, (_, slots) in enumerate(tokenized):
            for layer in range(L):
                # slots are in position order, the order in which masked_scatter fills
                mask[b * L + layer, [pos for pos, _ in slots]] = True
                rows += [self.rows[token][layer] for _, token in slots]
        rows_t = torch.stack(rows) if rows else torch.zeros(0, text_width(self.model.text_root), device=device)
        per_row = mask.sum(1).tolist()
        contexts, pooleds, taken = [], [], 0
        for first in range(0, ids.shape[0], ENCODE_BATCH):
            last = min(first + ENCODE_BATCH, ids.shape[0])
            n = sum(per_row[first:last])
            with rows_injected(self.model, mask[first:last], rows_t[taken:taken + n]):
                context, pooled = encode_ids(self.model, ids[first:last])
            taken += n
            contexts.append(context)
            if pooled is not None:
                pooleds.append(pooled)
        return torch.cat(contexts), torch.cat(pooleds) if pooleds else None


def bind_prompts(model: SD1Model | SDXLModel, prompts: Sequence[str], concepts: Sequence[Concept] = ()) -> torch.Tensor:
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
