"""sgm/modules/encoders/modules.py: the conditioner and the embedders SDXL base uses.

- `GeneralConditioner(emb_models)`: each embedder gets `is_trainable`, `ucg_rate`, `input_key`
  and `legacy_ucg_val` from its config (an embedder not trainable is frozen and put in eval
  mode); `forward(batch, force_zero_embeddings)` runs every embedder on `batch[input_key]`, sorts
  each output by its number of dimensions (2 -> "vector", 3 -> "crossattn"), zeroes the outputs of
  embedders whose input key is in `force_zero_embeddings`, and concatenates outputs of the same
  key in embedder order ("vector" along dim 1, "crossattn" along dim 2).
- `FrozenCLIPEmbedder`: a transformers CLIPTextModel and tokenizer; layer "last", "pooled" or
  "hidden" (`hidden_states[layer_idx]`; SDXL base: "hidden", layer_idx 11 of 12 layers, so the
  penultimate layer, without the final layer norm).
- `FrozenOpenCLIPEmbedder2`: OpenCLIP's text tower (`model`, see `OpenCLIPTextTower`). With
  `legacy=False` (SDXL base) `encode_with_transformer` returns {"penultimate", "last", "pooled"}:
  the input of the last residual block, the output of the last one, and ln_final(last) at the
  argmax token id (the end-of-text id, the highest) times `text_projection`. Neither penultimate
  nor last goes through ln_final.
- `ConcatTimestepEmbedderND(outdim)`: each number of a [B, n] input to `outdim` sinusoidal
  features (cos half then sin half, max period 10000), flattened to [B, n * outdim].

The double's OpenCLIP tokenizer is the CLIP tokenizer (the same vocabulary); the real one is
open_clip's SimpleTokenizer.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import nullcontext
from typing import ClassVar

import torch
from torch import nn


class AbstractEmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.is_trainable = None
        self.ucg_rate = None
        self.input_key = None


def _disabled_train(self, mode=True):
    return self


class GeneralConditioner(nn.Module):
    OUTPUT_DIM2KEYS: ClassVar[dict] = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM: ClassVar[dict] = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, emb_models: list[dict]):
        """`emb_models`: configs as sgm's yaml has them, with `target` a callable (not a dotted
        name) called with `params`."""
        super().__init__()
        embedders = []
        for config in emb_models:
            embedder = config["target"](**config.get("params", {}))
            assert isinstance(embedder, AbstractEmbModel), f"{type(embedder).__name__} has to inherit from AbstractEmbModel"
            embedder.is_trainable = config.get("is_trainable", False)
            embedder.ucg_rate = config.get("ucg_rate", 0.0)
            if not embedder.is_trainable:
                embedder.train = _disabled_train.__get__(embedder)
                for param in embedder.parameters():
                    param.requires_grad = False
                embedder.eval()
            if "input_key" in config:
                embedder.input_key = config["input_key"]
            elif "input_keys" in config:
                embedder.input_keys = config["input_keys"]
            else:
                raise KeyError(f"need either 'input_key' or 'input_keys' for embedder {type(embedder).__name__}")
            embedder.legacy_ucg_val = config.get("legacy_ucg_value", None)
            if embedder.legacy_ucg_val is not None:
                raise NotImplementedError("the sgm double has no legacy_ucg_value")
            embedders.append(embedder)
        self.embedders = nn.ModuleList(embedders)

    def forward(self, batch: dict, force_zero_embeddings: list | None = None) -> dict:
        output: dict = {}
        force_zero_embeddings = force_zero_embeddings or []
        for embedder in self.embedders:
            context = nullcontext if embedder.is_trainable else torch.no_grad
            with context():
                if getattr(embedder, "input_key", None) is not None:
                    if embedder.legacy_ucg_val is not None:
                        raise NotImplementedError("the sgm double has no legacy_ucg_value")
                    emb_out = embedder(batch[embedder.input_key])
                elif hasattr(embedder, "input_keys"):
                    emb_out = embedder(*[batch[k] for k in embedder.input_keys])
            assert isinstance(emb_out, (torch.Tensor, list, tuple)), \
                f"encoder outputs must be tensors or a sequence, but got {type(emb_out)}"
            if not isinstance(emb_out, (list, tuple)):
                emb_out = [emb_out]
            for emb in emb_out:
                key = self.OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.ucg_rate > 0.0:
                    # sgm drops whole rows at random (bernoulli); the host sets every rate to 0
                    raise NotImplementedError("the sgm double has no unconditional dropout (ucg_rate > 0)")
                if getattr(embedder, "input_key", None) in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                output[key] = torch.cat((output[key], emb), self.KEY2CATDIM[key]) if key in output else emb
        return output


class FrozenCLIPEmbedder(AbstractEmbModel):
    LAYERS = ("last", "pooled", "hidden")

    def __init__(self, transformer, tokenizer, max_length=77, layer="last", layer_idx=None,
                 always_return_pooled=False, device="cpu"):
        super().__init__()
        assert layer in self.LAYERS
        self.tokenizer = tokenizer
        self.transformer = transformer.eval()
        for param in self.parameters():
            param.requires_grad = False
        self.device = device
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        self.return_pooled = always_return_pooled
        if layer == "hidden":
            assert layer_idx is not None
            assert 0 <= abs(layer_idx) <= 12

    def forward(self, text):
        tokens = self.tokenizer(text, truncation=True, max_length=self.max_length, return_length=True,
                                return_overflowing_tokens=False, padding="max_length", return_tensors="pt")["input_ids"]
        outputs = self.transformer(input_ids=tokens.to(self.device), output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            z = outputs.last_hidden_state
        elif self.layer == "pooled":
            z = outputs.pooler_output[:, None, :]
        else:
            z = outputs.hidden_states[self.layer_idx]
        if self.return_pooled:
            return z, outputs.pooler_output
        return z

    def encode(self, text):
        return self(text)


# --------------------------------------------------------------------- OpenCLIP's text tower
class ResidualAttentionBlock(nn.Module):
    """open_clip's block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); sequence-first (L, N, D)
    tensors, a fused-projection `nn.MultiheadAttention`, mlp = c_fc, GELU, c_proj."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, mlp_width)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(mlp_width, width))]))

    def attention(self, x, attn_mask=None):
        return self.attn(x, x, x, need_weights=False, attn_mask=attn_mask)[0]

    def forward(self, x, attn_mask=None):
        x = x + self.attention(self.ln_1(x), attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_width) for _ in range(layers)])


class OpenCLIPTextTower(nn.Module):
    """What FrozenOpenCLIPEmbedder2.model keeps of open_clip's CLIP once `visual` is deleted:
    token_embedding, positional_embedding [ctx, width], transformer.resblocks, ln_final,
    text_projection [width, embed] (used as x @ P), logit_scale, and the causal `attn_mask`
    (a non-persistent buffer: -inf above the diagonal)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, embed_dim: int,
                 vocab_size: int = 49408, context_length: int = 77):
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_width)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)


class FrozenOpenCLIPEmbedder2(AbstractEmbModel):
    LAYERS = ("pooled", "last", "penultimate")

    def __init__(self, model: OpenCLIPTextTower, tokenizer: OpenCLIPTokenizer, max_length=77, layer="last",
                 always_return_pooled=False, legacy=True, device="cpu"):
        super().__init__()
        assert layer in self.LAYERS
        self.model = model.eval()
        for param in self.parameters():
            param.requires_grad = False
        self.open_clip_tokenizer = tokenizer  # the double's stand-in for open_clip's module-level one
        self.device = device
        self.max_length = max_length
        self.return_pooled = always_return_pooled
        self.layer = layer
        if layer == "last":
            self.layer_idx = 0
        elif layer == "penultimate":
            self.layer_idx = 1
        else:
            raise NotImplementedError()
        self.legacy = legacy

    def forward(self, text):
        z = self.encode_with_transformer(self.open_clip_tokenizer.tokenize(text, self.max_length).to(self.device))
        if not self.return_pooled and self.legacy:
            return z
        if self.return_pooled:
            assert not self.legacy
            return z[self.layer], z["pooled"]
        return z[self.layer]

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text) + self.model.positional_embedding
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.text_transformer_forward(x, attn_mask=self.model.attn_mask)
        if self.legacy:
            return self.model.ln_final(x[self.layer])
        last = self.model.ln_final(x["last"])
        x["pooled"] = self.pool(last, text)
        return x

    def pool(self, x, text):
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.model.text_projection

    def text_transformer_forward(self, x, attn_mask=None):
        outputs = {}
        blocks = self.model.transformer.resblocks
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                outputs["penultimate"] = x.permute(1, 0, 2)
            x = block(x, attn_mask=attn_mask)
        outputs["last"] = x.permute(1, 0, 2)
        return outputs

    def encode(self, text):
        return self(text)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ConcatTimestepEmbedderND(AbstractEmbModel):
    def __init__(self, outdim: int):
        super().__init__()
        self.outdim = outdim

    def forward(self, x):
        if x.ndim == 1:
            x = x[:, None]
        assert len(x.shape) == 2
        b, dims = x.shape
        emb = timestep_embedding(x.reshape(-1), self.outdim)
        return emb.reshape(b, dims * self.outdim)


class OpenCLIPTokenizer:
    """Stands in for open_clip's SimpleTokenizer (`open_clip.tokenizer._tokenizer`) and
    `open_clip.tokenize`, on the CLIP tokenizer (the same BPE vocabulary): `encoder` maps tokens to
    ids, with open_clip's names `<start_of_text>` / `<end_of_text>` for the special tokens;
    `encode(text)` gives ids without them; `tokenize(texts)` is [sot] + ids + [eot], cut to the
    context length (the last kept id then being eot) and padded with 0."""

    def __init__(self, clip_tokenizer):
        self.clip_tokenizer = clip_tokenizer
        self.encoder = dict(clip_tokenizer.get_vocab())
        self.encoder["<start_of_text>"] = clip_tokenizer.bos_token_id
        self.encoder["<end_of_text>"] = clip_tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.clip_tokenizer(text, truncation=False, add_special_tokens=False)["input_ids"]

    def tokenize(self, texts, context_length: int = 77) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        sot, eot = self.encoder["<start_of_text>"], self.encoder["<end_of_text>"]
        result = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [sot, *self.encode(text), eot]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = eot
            result[i, :len(ids)] = torch.tensor(ids)
        return result
