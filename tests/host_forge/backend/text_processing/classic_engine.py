"""The CLIP prompt encoder with textual inversion (Forge: backend/text_processing/classic_engine.py).

Tokens are read 75 to a chunk between BOS and EOS; an embedding found at a position takes
`embedding.vectors` places, filled by the token-embedding wrapper from `embedding.vec` (a dict's
entry for this engine's key). Each call prints a line per embedding used and appends their names
to the module-level `last_extra_generation_params["TI"]`. Stricter than Forge: one chunk only,
and no emphasis or BREAK (refused).
"""

from __future__ import annotations

import torch

last_extra_generation_params: dict = {}

CHUNK = 75


class CLIPEmbeddingForTextualInversion(torch.nn.Module):
    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key
        self.weight = self.wrapped.weight

    def forward(self, input_ids):
        batch_fixes, self.embeddings.fixes = self.embeddings.fixes, None
        inputs_embeds = self.wrapped(input_ids)
        if not batch_fixes or max(len(x) for x in batch_fixes) == 0:
            return inputs_embeds
        vecs = []
        for fixes, tensor in zip(batch_fixes, inputs_embeds):
            for offset, embedding in fixes:
                emb = embedding.vec[self.textual_inversion_key] if isinstance(embedding.vec, dict) else embedding.vec
                emb = emb.to(inputs_embeds)
                n = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[:offset + 1], emb[:n], tensor[offset + 1 + n:]]).to(inputs_embeds.dtype)
            vecs.append(tensor)
        return torch.stack(vecs)


class ClassicTextProcessingEngine:
    def __init__(self, text_encoder, tokenizer, embedding_key="clip_l"):
        from backend.text_processing.textual_inversion import EmbeddingDatabase

        self.embeddings = EmbeddingDatabase(tokenizer)
        self.embedding_key = embedding_key
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        model_embeddings = text_encoder.transformer.text_model.embeddings
        model_embeddings.token_embedding = CLIPEmbeddingForTextualInversion(
            model_embeddings.token_embedding, self.embeddings, textual_inversion_key=embedding_key)

    def tokenize_line(self, line: str) -> tuple[list[int], list]:
        if any(c in line for c in "()[]") or "BREAK" in line:
            raise NotImplementedError(f"the Forge double encodes no emphasis or BREAK: {line!r}")
        ids = self.tokenizer([line], truncation=False, add_special_tokens=False)["input_ids"][0]
        tokens, fixes, position = [], [], 0
        while position < len(ids):
            embedding, length = self.embeddings.find_embedding_at_position(ids, position)
            if embedding is None:
                tokens.append(ids[position])
                position += 1
                continue
            fixes.append((len(tokens), embedding))
            tokens += [0] * int(embedding.vectors)
            position += length
        if len(tokens) > CHUNK:
            raise NotImplementedError(f"the Forge double encodes one {CHUNK}-token chunk: {line!r}")
        end = self.tokenizer.eos_token_id
        return [self.tokenizer.bos_token_id, *tokens, *[end] * (CHUNK - len(tokens)), end], fixes

    def __call__(self, texts):
        lines = [self.tokenize_line(text) for text in texts]
        self.embeddings.fixes = [fixes for _, fixes in lines]
        used = {e.name: e for _, fixes in lines for _, e in fixes}
        tokens = torch.asarray([t for t, _ in lines])
        transformer = self.text_encoder.transformer
        z = transformer.text_model.final_layer_norm(transformer(tokens, output_hidden_states=True).hidden_states[-1])
        if used:
            names = []
            for name in used:
                print(f"[Textual Inversion] Used Embedding [{name}] in CLIP of [{self.embedding_key}]")
                names.append(name.replace(":", "").replace(",", ""))
            if "TI" in last_extra_generation_params:
                last_extra_generation_params["TI"] += ", " + ", ".join(names)
            else:
                last_extra_generation_params["TI"] = ", ".join(names)
        return z
