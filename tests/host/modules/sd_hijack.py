"""The host's model hijack (modules/sd_hijack.py): prompt encoder wrapper, embedding fixes,
and attention replaced at class level by the selected optimisation.

SDXL (a model with a `conditioner`): each embedder is wrapped by its type name, as the host does:
`FrozenCLIPEmbedder` -> FrozenCLIPEmbedderForSDXLWithCustomWords (token embedding in
EmbeddingsWithFixes, key clip_l), `FrozenOpenCLIPEmbedder2` -> FrozenOpenCLIPEmbedder2WithCustomWords
(`model.token_embedding` in EmbeddingsWithFixes with key clip_g); `cond_stage_model` becomes the
conditioner itself (more than one text model). Undo unwraps both and deletes `cond_stage_model`."""

from __future__ import annotations

import torch

from modules import devices
from modules.textual_inversion.textual_inversion import EmbeddingDatabase


class EmbeddingsWithFixes(torch.nn.Module):
    """Replaces input-embedding rows at the positions the prompt tokenizer marked (`fixes`)."""

    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key

    def forward(self, input_ids):
        batch_fixes = self.embeddings.fixes
        self.embeddings.fixes = None
        inputs_embeds = self.wrapped(input_ids)
        if not batch_fixes or max(len(x) for x in batch_fixes) == 0:
            return inputs_embeds
        rows = []
        for fixes, tensor in zip(batch_fixes, inputs_embeds):
            for offset, embedding in fixes:
                # the host keeps these on devices.device in float32 and concatenates them with the
                # token embeddings there: a vector anywhere else fails, as torch.cat does on CUDA
                vec = embedding.vec[self.textual_inversion_key] if isinstance(embedding.vec, dict) else embedding.vec
                vec = devices.require_on_device(vec, f"embedding {embedding.name!r}", torch.float32)
                emb = devices.cond_cast_unet(vec)
                n = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[0:offset + 1], emb[0:n], tensor[offset + 1 + n:]]).to(inputs_embeds.dtype)
            rows.append(tensor)
        return torch.stack(rows)


class StableDiffusionModelHijack:
    def __init__(self) -> None:
        self.fixes = None
        self.layers = None
        self.circular_enabled = False
        self.clip = None
        self.comments: list[str] = []
        self.extra_generation_params: dict = {}
        self.embedding_db = EmbeddingDatabase()

    def hijack(self, m) -> None:
        from modules import sd_hijack_clip, sd_hijack_open_clip, sd_hijack_optimizations, sd_hijack_unet

        conditioner = getattr(m, "conditioner", None)
        if conditioner:
            text_cond_models = []
            for i, embedder in enumerate(conditioner.embedders):
                typename = type(embedder).__name__
                if typename == "FrozenOpenCLIPEmbedder":
                    raise NotImplementedError("the test double has no SD2-style OpenCLIP embedder in a conditioner")
                if typename == "FrozenCLIPEmbedder":
                    embeddings = embedder.transformer.text_model.embeddings
                    embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding, self)
                    conditioner.embedders[i] = sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords(embedder, self)
                    text_cond_models.append(conditioner.embedders[i])
                if typename == "FrozenOpenCLIPEmbedder2":
                    embedder.model.token_embedding = EmbeddingsWithFixes(embedder.model.token_embedding, self,
                                                                         textual_inversion_key="clip_g")
                    conditioner.embedders[i] = sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords(embedder, self)
                    text_cond_models.append(conditioner.embedders[i])
            m.cond_stage_model = text_cond_models[0] if len(text_cond_models) == 1 else conditioner
        else:
            embeddings = m.cond_stage_model.transformer.text_model.embeddings
            embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding, self)
            m.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        self.clip = m.cond_stage_model
        sd_hijack_optimizations.apply()
        sd_hijack_unet.apply()

    def undo_hijack(self, m) -> None:
        """The prompt encoder and the token embedding unwrapped, the attention optimisation removed."""
        from modules import sd_hijack_clip, sd_hijack_open_clip, sd_hijack_optimizations

        conditioner = getattr(m, "conditioner", None)
        if conditioner:
            for i, embedder in enumerate(conditioner.embedders):
                if isinstance(embedder, sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords):
                    embedder.wrapped.model.token_embedding = embedder.wrapped.model.token_embedding.wrapped
                    conditioner.embedders[i] = embedder.wrapped
                if isinstance(embedder, sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords):
                    embeddings = embedder.wrapped.transformer.text_model.embeddings
                    embeddings.token_embedding = embeddings.token_embedding.wrapped
                    conditioner.embedders[i] = embedder.wrapped
            if hasattr(m, "cond_stage_model"):
                delattr(m, "cond_stage_model")
        elif type(m.cond_stage_model) is sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords:
            m.cond_stage_model = m.cond_stage_model.wrapped
            embeddings = m.cond_stage_model.transformer.text_model.embeddings
            if type(embeddings.token_embedding) is EmbeddingsWithFixes:
                embeddings.token_embedding = embeddings.token_embedding.wrapped
        sd_hijack_optimizations.undo()
        self.apply_circular(False)
        self.layers = None
        self.clip = None

    def apply_circular(self, enable: bool) -> None:
        self.circular_enabled = enable

    def clear_comments(self) -> None:
        self.comments = []
        self.extra_generation_params = {}

    def get_prompt_lengths(self, text: str) -> tuple[int, int]:
        _, token_count = self.clip.process_texts([text])
        return token_count, self.clip.get_target_prompt_token_count(token_count)


model_hijack = StableDiffusionModelHijack()
