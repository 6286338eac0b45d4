"""modules/sd_hijack_open_clip.py: SDXL's OpenCLIP bigG wrapper, FrozenOpenCLIPEmbedder2WithCustomWords.

Same chunking as CLIP (the base class); ids from open_clip's tokenizer (start, end and comma from
its `encoder`), `id_pad` 0, so every id after the first end-of-text becomes 0 before encoding.
`encode_with_transformers` takes `wrapped.encode_with_transformer(tokens)[wrapped.layer]`
("penultimate" for SDXL base) and hangs the dict's "pooled" on it. The double's tokenizer is the
CLIP tokenizer in open_clip's clothes (`sgm.modules.encoders.modules.OpenCLIPTokenizer`).
"""

from __future__ import annotations

import torch

from modules import devices, sd_hijack_clip
from modules.shared import opts


def _tokenizer(wrapped):
    return wrapped.open_clip_tokenizer


class FrozenOpenCLIPEmbedder2WithCustomWords(sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        tokenizer = _tokenizer(wrapped)
        self.comma_token = next(v for k, v in tokenizer.encoder.items() if k == ",</w>")
        self.id_start = tokenizer.encoder["<start_of_text>"]
        self.id_end = tokenizer.encoder["<end_of_text>"]
        self.id_pad = 0

    def tokenize(self, texts):
        assert not getattr(opts, "use_old_emphasis_implementation", False), \
            "Old emphasis implementation not supported for Open Clip"
        return [_tokenizer(self.wrapped).encode(text) for text in texts]

    def encode_with_transformers(self, tokens):
        d = self.wrapped.encode_with_transformer(tokens)
        z = d[self.wrapped.layer]
        pooled = d.get("pooled")
        if pooled is not None:
            z.pooled = pooled
        return z

    def encode_embedding_init_text(self, init_text, nvpt):
        ids = torch.asarray([_tokenizer(self.wrapped).encode(init_text)], device=devices.device, dtype=torch.int)
        wrapped = self.wrapped.model.token_embedding.wrapped
        return wrapped(ids.to(wrapped.weight.device)).squeeze(0)
