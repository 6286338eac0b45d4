"""Textual-inversion embeddings (modules/textual_inversion/textual_inversion.py)."""

from __future__ import annotations

import hashlib
import os

import safetensors.torch
import torch

from modules import devices, shared


class Embedding:
    """As in the host, `vectors` and `shape` start at 0/None: whoever registers must set them."""

    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0
        self.filename = None
        self.hash = None
        self.shorthash = None
        self.sd_checkpoint = None
        self.sd_checkpoint_name = None

    def set_hash(self, v: str) -> None:
        self.hash = v
        self.shorthash = v[0:12]


def create_embedding_from_data(data, name, filename="unknown embedding file", filepath=None):
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "embedding file has multiple terms in it"
        vec = next(iter(params.values())).detach().to(devices.device, dtype=torch.float32)
    elif type(data) is dict and "clip_g" in data and "clip_l" in data:  # SDXL: one vector set per encoder
        vec = {k: v.detach().to(devices.device, dtype=torch.float32) for k, v in data.items()}
        embedding = Embedding(vec, name)
        embedding.step = data.get("step", None)
        embedding.vectors = data["clip_g"].shape[0]
        embedding.shape = data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
        if filepath:
            embedding.filename = filepath
            with open(filepath, "rb") as f:
                embedding.set_hash(hashlib.sha256(f.read()).hexdigest())
        return embedding
    elif isinstance(data, dict) and data and isinstance(next(iter(data.values())), torch.Tensor):
        assert len(data) == 1, "embedding file has multiple terms in it"
        vec = next(iter(data.values()))
        vec = (vec.unsqueeze(0) if vec.dim() == 1 else vec).detach().to(devices.device, dtype=torch.float32)
    else:
        raise Exception(f"Couldn't identify {filename} as neither textual inversion embedding nor diffuser concept.")
    embedding = Embedding(vec, name)
    embedding.step = data.get("step", None)
    embedding.vectors = vec.shape[0]
    embedding.shape = vec.shape[-1]
    if filepath:
        embedding.filename = filepath
        with open(filepath, "rb") as f:
            embedding.set_hash(hashlib.sha256(f.read()).hexdigest())
    return embedding


class EmbeddingDatabase:
    def __init__(self):
        self.ids_lookup: dict[int, list] = {}
        self.word_embeddings: dict[str, Embedding] = {}
        self.skipped_embeddings: dict[str, Embedding] = {}
        self.expected_shape = -1
        self.embedding_dirs: dict[str, str] = {}

    def add_embedding_dir(self, path: str) -> None:
        self.embedding_dirs[path] = path

    def clear_embedding_dirs(self) -> None:
        self.embedding_dirs.clear()

    def register_embedding(self, embedding, model):
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding, model, name):
        ids = model.cond_stage_model.tokenize([name])[0]
        first_id = ids[0]
        lookup = self.ids_lookup.setdefault(first_id, [])
        if name in self.word_embeddings:
            lookup = [x for x in lookup if x[1].name != name]
        if embedding is not None:
            lookup = [*lookup, (ids, embedding)]
        self.ids_lookup[first_id] = sorted(lookup, key=lambda x: len(x[0]), reverse=True)
        if embedding is None:
            self.word_embeddings.pop(name, None)
            if not self.ids_lookup[first_id]:
                del self.ids_lookup[first_id]
            return None
        self.word_embeddings[name] = embedding
        return embedding

    def get_expected_shape(self) -> int:
        vec = shared.sd_model.cond_stage_model.encode_embedding_init_text(",", 1)
        return vec.shape[1]

    def load_from_file(self, path: str, filename: str) -> None:
        name, ext = os.path.splitext(filename)
        ext = ext.upper()
        if ext in (".BIN", ".PT"):
            # the host's torch.load goes through its restricted unpickler (modules/safe.py)
            data = torch.load(path, map_location="cpu", weights_only=True)
        elif ext == ".SAFETENSORS":
            data = safetensors.torch.load_file(path, device="cpu")
        else:
            return
        embedding = create_embedding_from_data(data, name, filename=filename, filepath=path)
        if self.expected_shape in (-1, embedding.shape):
            self.register_embedding(embedding, shared.sd_model)
        else:
            self.skipped_embeddings[name] = embedding

    def load_textual_inversion_embeddings(self, force_reload: bool = False) -> None:
        """The host reloads when a folder changed; the double always reloads (never more lenient):
        anything registered before `process_images` is gone once it starts."""
        self.ids_lookup.clear()
        self.word_embeddings.clear()
        self.skipped_embeddings.clear()
        self.expected_shape = self.get_expected_shape()
        for embdir in self.embedding_dirs.values():
            if not os.path.isdir(embdir):
                continue
            for root, _, fns in os.walk(embdir, followlinks=True):
                for fn in sorted(fns):
                    full = os.path.join(root, fn)
                    if os.stat(full).st_size == 0:
                        continue
                    try:
                        self.load_from_file(full, fn)
                    except Exception as e:  # the host reports and skips a bad file
                        print(f"Error loading embedding {fn}: {e}")

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in self.ids_lookup.get(tokens[offset], ()):
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None
