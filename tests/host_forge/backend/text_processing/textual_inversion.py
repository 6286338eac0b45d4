"""Textual-inversion embeddings per encoding engine (Forge: backend/text_processing/textual_inversion.py).

Unlike A1111's database there is one per engine, `register_embedding_by_name` takes no model, and
embeddings are loaded once with the model rather than at every generation.
"""

from __future__ import annotations


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0  # as in Forge: set it, or the embedding inserts nothing
        self.sd_checkpoint = None
        self.sd_checkpoint_name = None


class EmbeddingDatabase:
    def __init__(self, tokenizer, expected_shape=-1):
        self.ids_lookup: dict[int, list] = {}
        self.word_embeddings: dict[str, Embedding] = {}
        self.expected_shape = expected_shape
        self.tokenizer = tokenizer
        self.fixes = None

    def register_embedding(self, embedding):
        return self.register_embedding_by_name(embedding, embedding.name)

    def register_embedding_by_name(self, embedding, name):
        """Register under `name` (its token ids), or with None remove that name."""
        ids = self.tokenizer([name], truncation=False, add_special_tokens=False)["input_ids"][0]
        first = ids[0]
        lookup = [x for x in self.ids_lookup.get(first, []) if x[1].name != name] if name in self.word_embeddings \
            else self.ids_lookup.get(first, [])
        if embedding is not None:
            lookup = [*lookup, (ids, embedding)]
        self.ids_lookup[first] = sorted(lookup, key=lambda x: len(x[0]), reverse=True)
        if embedding is None:
            self.word_embeddings.pop(name, None)
            if not self.ids_lookup[first]:
                del self.ids_lookup[first]
            return None
        self.word_embeddings[name] = embedding
        return embedding

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in self.ids_lookup.get(tokens[offset], []):
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None
