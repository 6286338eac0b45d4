"""The host's prompt encoders (modules/sd_hijack_clip.py): 75-token chunks, emphasis, BREAK,
textual-inversion embeddings, clip skip; SD1's CLIP and SDXL's CLIP-L (`...ForSDXL...`). SDXL's
OpenCLIP bigG wrapper is in sd_hijack_open_clip.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from modules import prompt_parser
from modules.shared import opts


@dataclass
class PromptChunk:
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list = field(default_factory=list)


@dataclass
class PromptChunkFix:
    offset: int
    embedding: object

    def __iter__(self):
        return iter((self.offset, self.embedding))


class FrozenCLIPEmbedder(torch.nn.Module):
    """ldm's FrozenCLIPEmbedder: holds `transformer` (CLIPTextModel) and `tokenizer`."""

    def __init__(self, transformer, tokenizer):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer


class FrozenCLIPEmbedderWithCustomWordsBase(torch.nn.Module):
    """The host's TextConditionalModel + FrozenCLIPEmbedderWithCustomWordsBase: chunks of 75
    tokens, emphasis, BREAK, embeddings; the subclass says how to tokenize and encode. Tokens after
    the first end id become `id_pad` when that differs from `id_end` (OpenCLIP pads with 0).
    With `return_pooled` (from the wrapped embedder), `forward` returns (z, pooled of the first
    chunk), which is what sgm's conditioner takes as crossattn and vector."""

    def __init__(self, wrapped, hijack):
        super().__init__()
        self.hijack = hijack
        self.wrapped = wrapped
        self.chunk_length = 75
        self.is_trainable = getattr(wrapped, "is_trainable", False)
        self.input_key = getattr(wrapped, "input_key", "txt")
        self.return_pooled = getattr(wrapped, "return_pooled", False)
        self.legacy_ucg_val = None  # for sgm's conditioner
        self.comma_token = None
        self.id_start = None
        self.id_end = None
        self.id_pad = None

    def empty_chunk(self) -> PromptChunk:
        return PromptChunk([self.id_start] + [self.id_end] * (self.chunk_length + 1), [1.0] * (self.chunk_length + 2))

    def get_target_prompt_token_count(self, token_count: int) -> int:
        return math.ceil(max(token_count, 1) / self.chunk_length) * self.chunk_length

    def tokenize_line(self, line: str):
        parsed = prompt_parser.parse_prompt_attention(line) if opts.emphasis != "None" else [[line, 1.0]]
        tokenized = self.tokenize([text for text, _ in parsed])
        chunks: list[PromptChunk] = []
        chunk = PromptChunk()
        token_count = 0
        last_comma = -1

        def close_chunk(is_last: bool = False) -> None:
            nonlocal chunk, token_count, last_comma
            token_count += len(chunk.tokens) if is_last else self.chunk_length
            pad = self.chunk_length - len(chunk.tokens)
            chunk.tokens = [self.id_start, *chunk.tokens, *[self.id_end] * max(pad, 0), self.id_end]
            chunk.multipliers = [1.0, *chunk.multipliers, *[1.0] * max(pad, 0), 1.0]
            chunks.append(chunk)
            chunk = PromptChunk()
            last_comma = -1

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == "BREAK" and weight == -1:
                close_chunk()
                continue
            pos = 0
            while pos < len(tokens):
                token = tokens[pos]
                if token == self.comma_token:
                    last_comma = len(chunk.tokens)
                elif (opts.comma_padding_backtrack != 0 and len(chunk.tokens) == self.chunk_length
                      and last_comma != -1 and len(chunk.tokens) - last_comma <= opts.comma_padding_backtrack):
                    cut = last_comma + 1
                    moved_tokens, moved_mults = chunk.tokens[cut:], chunk.multipliers[cut:]
                    chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                    close_chunk()
                    chunk.tokens, chunk.multipliers = moved_tokens, moved_mults
                if len(chunk.tokens) == self.chunk_length:
                    close_chunk()
                embedding, n_ids = self.hijack.embedding_db.find_embedding_at_position(tokens, pos)
                if embedding is None:
                    chunk.tokens.append(token)
                    chunk.multipliers.append(weight)
                    pos += 1
                    continue
                n_vec = int(embedding.vectors)
                if len(chunk.tokens) + n_vec > self.chunk_length:
                    close_chunk()
                chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding))
                chunk.tokens += [0] * n_vec
                chunk.multipliers += [weight] * n_vec
                pos += n_ids
        if chunk.tokens or not chunks:
            close_chunk(is_last=True)
        return chunks, token_count

    def process_texts(self, texts):
        cache: dict[str, list] = {}
        batch_chunks, token_count = [], 0
        for line in texts:
            if line not in cache:
                chunks, count = self.tokenize_line(line)
                token_count = max(token_count, count)
                cache[line] = chunks
            batch_chunks.append(cache[line])
        return batch_chunks, token_count

    def forward(self, texts):
        batch_chunks, _ = self.process_texts(texts)
        zs = []
        for i in range(max(len(x) for x in batch_chunks)):
            batch_chunk = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            self.hijack.fixes = [x.fixes for x in batch_chunk]
            zs.append(self.process_tokens([x.tokens for x in batch_chunk], [x.multipliers for x in batch_chunk]))
        if self.return_pooled:
            return torch.hstack(zs), zs[0].pooled
        return torch.hstack(zs)

    def process_tokens(self, batch_tokens, batch_multipliers):
        tokens = torch.asarray(batch_tokens)
        if self.id_end != self.id_pad:
            for row, ids in enumerate(batch_tokens):
                tokens[row, ids.index(self.id_end) + 1:] = self.id_pad
        z = self.encode_with_transformers(tokens)
        pooled = getattr(z, "pooled", None)
        if opts.emphasis in ("Original", "No norm"):
            mults = torch.asarray(batch_multipliers, dtype=z.dtype)
            original_mean = z.mean()
            z = z * mults.unsqueeze(-1)
            if opts.emphasis == "Original":
                z = z * (original_mean / z.mean())
        if pooled is not None:
            z.pooled = pooled
        return z


class FrozenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedderWithCustomWordsBase):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.tokenizer = wrapped.tokenizer
        vocab = self.tokenizer.get_vocab()
        self.comma_token = vocab.get(",</w>", None)
        self.id_start = self.tokenizer.bos_token_id
        self.id_end = self.tokenizer.eos_token_id
        self.id_pad = self.id_end

    # the host reaches the text model through these
    @property
    def transformer(self):
        return self.wrapped.transformer

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=-opts.CLIP_stop_at_last_layers)
        if opts.CLIP_stop_at_last_layers > 1:
            z = outputs.hidden_states[-opts.CLIP_stop_at_last_layers]
            return self.wrapped.transformer.text_model.final_layer_norm(z)
        return outputs.last_hidden_state

    def encode_embedding_init_text(self, init_text: str, nvpt: int):
        embedding_layer = self.wrapped.transformer.text_model.embeddings
        ids = self.tokenizer(init_text, max_length=nvpt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return embedding_layer.token_embedding.wrapped(ids).squeeze(0)


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    """SDXL's CLIP-L: `hidden_states[wrapped.layer_idx]` (no final layer norm), or
    `hidden_states[-CLIP_stop_at_last_layers]` when `sdxl_clip_l_skip` is on, or the last hidden
    state for layer "last"."""

    def encode_with_transformers(self, tokens):
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=self.wrapped.layer == "hidden")
        if opts.sdxl_clip_l_skip is True:
            return outputs.hidden_states[-opts.CLIP_stop_at_last_layers]
        if self.wrapped.layer == "last":
            return outputs.last_hidden_state
        return outputs.hidden_states[self.wrapped.layer_idx]
