"""ED-LoRA concepts: the in-memory model, diffusers <-> host (ldm) module names, and applying a
concept's LoRA to a live model with bit-exact removal.

A concept is a few user tokens, each with one embedding row per UNet cross-attention layer
([L, D], L = 16 for SD1 in the order of `sd1.ATTN2_NAMES`), plus weight changes on text-encoder
and UNet layers: low-rank (delta W = scale * up @ down, `LoraFactor`) on linears for ED-LoRA, or
any kind the host's Lora applies (`ModuleDelta`: LoRA/LoCon on linears and convs, LoHa, LoKr, full
diffs, DoRA). A LoRA without embeddings is a concept by its trigger words instead of tokens. Module names are the host's:
ldm names for the UNet (relative to `diffusion_model`), transformers names for the text encoder
(relative to the CLIPTextModel) — the same names the live model and its checkpoint use.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lib_mos.models.family import SD1, ModelFamily


class ConceptError(ValueError):
    """A concept file or concept set is unusable; the message names the file and the key."""


@dataclass(frozen=True)
class LoraFactor:
    """delta W = scale * up @ down, with down [rank, in] and up [out, rank]: a plain LoRA on a
    linear layer (ED-LoRA, kohya attention LoRA). Every other layer kind is a `ModuleDelta`."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], self.down.shape[1])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.up.to(dtype) @ self.down.to(dtype)) * self.scale

    def matrix(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> torch.Tensor:
        """The change of the layer's weight as [out, in] (the multiplier not applied)."""
        return self.delta(dtype)

    def bias_delta(self) -> torch.Tensor | None:
        return None


# The file parts of each kind (`delta_kind` tries them in the host's order: LoRA, LoHa, (IA3),
# LoKr, full), and the parts the host reads for every kind (extensions-builtin/Lora/network.py).
SHARED_PARTS = {"alpha", "scale", "dora_scale", "bias"}
KIND_PARTS = {
    "lora": {"lora_up.weight", "lora_down.weight", "lora_mid.weight"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    "full": {"diff", "diff_b"},
}


def delta_kind(parts: Iterable[str]) -> str | None:
    """Which kind the host would build from these parts (None: no module type accepts them)."""
    have = set(parts)
    if {"lora_up.weight", "lora_down.weight"} <= have:
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= have:
        return "loha"
    one = "lokr_w1" in have or {"lokr_w1_a", "lokr_w1_b"} <= have
    two = "lokr_w2" in have or {"lokr_w2_a", "lokr_w2_b"} <= have
    if one and two:
        return "lokr"
    if "diff" in have:
        return "full"
    return None


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' CP (Tucker) rebuild of a factor pair around a core `t` (the host's make_weight_cp)."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


@dataclass(frozen=True)
class ModuleDelta:
    """One layer's change as a LoRA file stores it: `parts` are the file's tensors for the layer
    (`lora_down.weight`, `hada_w1_a`, `alpha`, `dora_scale`, ...; dtypes as stored). `weight_delta`
    rebuilds the change with the host's own arithmetic (extensions-builtin/Lora, v1.10.1), so what
    we fuse or apply is what `<lora:...>` applies. Kept as factors: a LoHa or LoCon over every SD1
    layer is far larger as dense matrices. `shape` is the shape the factors multiply out to (a
    layer takes the change when it has as many weights and the same outputs)."""

    kind: str
    parts: dict[str, torch.Tensor]
    shape: tuple[int, ...] = ()

    @classmethod
    def of(cls, kind: str, parts: dict[str, torch.Tensor]) -> ModuleDelta:
        """A change with its product shape worked out (raises RuntimeError if the factors do not
        multiply). The factors are multiplied on the meta device: shapes only, no arithmetic, so
        reading a LoRA over every layer of a full-size model stays cheap."""
        shapes_only = cls(kind, {k: torch.empty(v.shape, dtype=torch.float32, device="meta") for k, v in parts.items()})
        product, out = shapes_only._updown(torch.float32, upcast=True, layer_shape=None)
        return cls(kind, parts, tuple(int(d) for d in (out if product.numel() == math.prod(out) else product.shape)))

    @property
    def rank(self) -> int | None:
        if self.kind == "lora":
            return int(self.parts["lora_down.weight"].shape[0])
        return None

    def _dim(self) -> int | None:
        """The rank alpha is divided by, as the host picks it for each kind."""
        p = self.parts
        if self.kind == "lora":
            return int(p["lora_down.weight"].shape[0])
        if self.kind == "loha":
            return int(p["hada_w1_b"].shape[0])
        if self.kind == "lokr":
            dim = int(p["lokr_w1_b"].shape[0]) if "lokr_w1_b" in p else None
            return int(p["lokr_w2_b"].shape[0]) if "lokr_w2_b" in p else dim
        return None

    @property
    def scale(self) -> float:
        """`scale` if stored, else alpha / rank, else 1 (the host's calc_scale)."""
        p = self.parts
        if "scale" in p:
            return p["scale"].item()
        dim = self._dim()
        if dim is not None and "alpha" in p:
            return p["alpha"].item() / dim
        return 1.0

    def _updown(self, dtype: torch.dtype, *, upcast: bool, layer_shape: tuple[int, ...] | None,
                ) -> tuple[torch.Tensor, list[int]]:
        """The unscaled product and the shape the host reshapes it to. LoRA factors are cast to
        `dtype` (the host holds them in its compute dtype); the other kinds compute in the file's
        dtype as the host does, unless `upcast` (our own uses: fusion, measures)."""
        p = self.parts
        if upcast or self.kind == "lora":
            p = {k: v.to(dtype) for k, v in p.items()}
        conv = layer_shape is not None and len(layer_shape) == 4
        if self.kind == "lora":
            up, down, mid = p["lora_up.weight"], p["lora_down.weight"], p.get("lora_mid.weight")
            if conv and down.dim() == 2:
                down = down.reshape(down.shape[0], -1, 1, 1)
            out = [up.shape[0], down.shape[1]]
            if mid is not None:
                product = torch.einsum("n m k l, i n, m j -> i j k l", mid, up.reshape(up.shape[0], -1),
                                       down.reshape(down.shape[0], -1))
                return product, out + list(mid.shape[2:])
            if down.dim() == 4:
                out += list(down.shape[2:])
            return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(out), out
        if self.kind == "loha":
            w1a, w1b, w2a, w2b = (p[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
            out = [w1a.shape[0], w1b.shape[1]]
            if "hada_t1" in p:
                out = [w1a.shape[1], w1b.shape[1], *p["hada_t1"].shape[2:]]
                one = _cp(p["hada_t1"], w1a, w1b)
            else:
                if w1b.dim() == 4:
                    out += list(w1b.shape[2:])
                one = (w1a.reshape(w1a.shape[0], -1) @ w1b.reshape(w1b.shape[0], -1)).reshape(out)
            if "hada_t2" in p:
                two = _cp(p["hada_t2"], w2a, w2b)
            else:
                two = (w2a.reshape(w2a.shape[0], -1) @ w2b.reshape(w2b.shape[0], -1)).reshape(out)
            return one * two, out
        if self.kind == "lokr":
            w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
            if "lokr_w2" in p:
                w2 = p["lokr_w2"]
            elif "lokr_t2" in p:
                w2 = _cp(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
            else:
                w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
            out = [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
            if conv:
                out = list(layer_shape)
            if w2.dim() == 4:
                w1 = w1.unsqueeze(2).unsqueeze(2)
            kron = torch.kron(w1, w2.contiguous())
            if not conv and kron.dim() == 4:  # a conv change seen without its layer (`of`)
                out = list(kron.shape)
            return kron.reshape(out), out
        diff = p["diff"]
        return diff, list(diff.shape)

    def weight_delta(self, base: torch.Tensor, dtype: torch.dtype | None = None, *,
                     upcast: bool = False) -> torch.Tensor:
        """The change the host adds to a layer whose weight is `base` at multiplier 1 (before its
        cast back to the weight's dtype): bias diff, reshape, scale, DoRA, in the host's order.
        `dtype` is the host's compute dtype for LoRA factors (default: `base`'s)."""
        dtype = dtype or base.dtype
        try:
            updown, out = self._updown(dtype, upcast=upcast, layer_shape=tuple(base.shape))
        except RuntimeError as exc:
            # torch before 2.2 has no float16 matmul on the CPU (the WebUI's 2.1.2): there the host
            # itself fails; we compute in float32 and round to the file's dtype, as its result is
            if upcast or "not implemented for 'Half'" not in str(exc):
                raise
            stored = next(t.dtype for t in self.parts.values() if t.dim() > 0)
            updown, out = self._updown(torch.float32, upcast=True, layer_shape=tuple(base.shape))
            updown = updown.to(stored)
        if "bias" in self.parts:
            bias = self.parts["bias"]
            updown = (updown.reshape(bias.shape) + bias.to(base.device, dtype=updown.dtype)).reshape(out)
        if len(out) == 4:
            updown = updown.reshape(out)
        if base.numel() == updown.numel():
            updown = updown.reshape(base.shape)
        updown = updown * self.scale
        if "dora_scale" in self.parts:
            weight = base.to(updown.dtype)
            merged = updown.to(base.device) + weight
            cols = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
            cols = cols.reshape(merged.shape[1], *[1] * (base.dim() - 1)).transpose(0, 1)
            scale = self.parts["dora_scale"].to(device=base.device, dtype=updown.dtype)
            updown = merged * (scale / cols) - weight
        return updown

    def matrix(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> torch.Tensor:
        """The change as [out, in_unfolded] in `dtype`, every factor upcast first (convs: the
        weight's [out, in * kh * kw] view, the order `F.unfold` gives input patches). DoRA depends
        on the layer's `base` weight, in its real shape."""
        if "dora_scale" in self.parts and base is None:
            raise ValueError("a DoRA change depends on the layer's weight: pass base=")
        if base is None:
            base = torch.zeros(self.shape, dtype=dtype)
        change = self.weight_delta(base.to(dtype), dtype, upcast=True)
        return change.to(dtype).reshape(change.shape[0], -1)

    def bias_delta(self) -> torch.Tensor | None:
        """The layer bias change (`diff_b` of a full-diff file), else None."""
        return self.parts.get("diff_b")


Delta = LoraFactor | ModuleDelta


@dataclass
class Concept:
    """One concept as loaded from a file (see `lib_mos.concepts.files`)."""

    name: str
    tokens: tuple[str, ...]
    embeddings: torch.Tensor  # [n_tokens, L, D]
    unet_lora: dict[str, Delta] = field(default_factory=dict)
    text_lora: dict[str, Delta] = field(default_factory=dict)
    class_word: str | None = None
    # A LoRA without embeddings is a concept by its trigger words: no tokens to bind (`tokens` and
    # `embeddings` empty), the words go into prompts as they are. `trigger_source` says where they
    # came from (the user, the host's sidecar json, the file's tag frequencies).
    triggers: tuple[str, ...] = ()
    trigger_source: str | None = None
    base_model_hash: str | None = None
    source_path: str | None = None
    source_sha256: str | None = None
    family: ModelFamily = SD1  # the model family its layer names and embedding rows are for

    @property
    def prompt_words(self) -> str:
        """What stands for the concept in a prompt: its tokens, or its trigger words."""
        return " ".join(self.tokens) if self.tokens else ", ".join(self.triggers)

    @property
    def layers(self) -> int:
        return self.embeddings.shape[1]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[2]

    @property
    def rank(self) -> int | None:
        """The LoRA rank when every layer is a LoRA of one rank (None: mixed, or other kinds)."""
        ranks = {f.rank for f in (*self.unet_lora.values(), *self.text_lora.values())}
        return ranks.pop() if len(ranks) == 1 else None

    def token_rows(self, token: str) -> torch.Tensor:
        """The [L, D] rows of one user token."""
        return self.embeddings[self.tokens.index(token)]


# ------------------------------------------------------------------------------------ name mapping
# SD1 diffusers UNet blocks -> ldm blocks: down_blocks.i.attentions.j -> input_blocks.(3i+j+1).1,
# mid_block.attentions.0 -> middle_block.1, up_blocks.i.attentions.j -> output_blocks.(3i+j).1
# (up_blocks.0 has no attention in SD1). Inside a transformer block the names are equal.
_DOWN = re.compile(r"^down_blocks\.(\d)\.attentions\.(\d)\.(.+)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")
_UP = re.compile(r"^up_blocks\.(\d)\.attentions\.(\d)\.(.+)$")
_IN = re.compile(r"^input_blocks\.(\d+)\.1\.(.+)$")
_MIDL = re.compile(r"^middle_block\.1\.(.+)$")
_OUT = re.compile(r"^output_blocks\.(\d+)\.1\.(.+)$")


def unet_diffusers_to_ldm(name: str) -> str:
    """`down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q` ->
    `input_blocks.2.1.transformer_blocks.0.attn1.to_q`; KeyError for a name outside the SD1 blocks."""
    if m := _DOWN.match(name):
        i, j = int(m[1]), int(m[2])
        if i < 3 and j < 2:
            return f"input_blocks.{3 * i + j + 1}.1.{m[3]}"
    elif m := _MID.match(name):
        return f"middle_block.1.{m[1]}"
    elif m := _UP.match(name):
        i, j = int(m[1]), int(m[2])
        if 1 <= i <= 3 and j < 3:
            return f"output_blocks.{3 * i + j}.1.{m[3]}"
    raise KeyError(f"not an SD1 UNet attention-block module: {name}")


def unet_ldm_to_diffusers(name: str) -> str:
    """Inverse of `unet_diffusers_to_ldm`."""
    if m := _IN.match(name):
        n = int(m[1])
        if n in (1, 2, 4, 5, 7, 8):
            return f"down_blocks.{(n - 1) // 3}.attentions.{(n - 1) % 3}.{m[2]}"
    elif m := _MIDL.match(name):
        return f"mid_block.attentions.0.{m[1]}"
    elif m := _OUT.match(name):
        n = int(m[1])
        if 3 <= n <= 11:
            return f"up_blocks.{n // 3}.attentions.{n % 3}.{m[2]}"
    raise KeyError(f"not an SD1 UNet attention-block module: {name}")


# ------------------------------------------------------------------------------------ live models
def layer_kind(module: nn.Module) -> str | None:
    """"linear" or "conv" by the module's weight ([out, in] or [out, in, kh, kw]), None for any other
    module. By the weight, not the class: Forge's Linear and Conv2d are its own modules, not
    subclasses of torch's."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    return {2: "linear", 4: "conv"}.get(weight.dim())


def _layer(root: nn.Module, name: str, what: str) -> nn.Module:
    try:
        module = root.get_submodule(name)
    except AttributeError as e:
        raise ConceptError(f"{what}: no module {name!r} in the model") from e
    if layer_kind(module) is None:
        raise ConceptError(f"{what}: {name!r} is a {type(module).__name__}, not a Linear or Conv2d")
    return module


def _fits(delta: Delta, layer: nn.Module) -> bool:
    weight = layer.weight
    if isinstance(delta, LoraFactor):
        return layer_kind(layer) == "linear" and tuple(delta.down.shape) == (delta.rank, weight.shape[1]) \
            and tuple(delta.up.shape) == (weight.shape[0], delta.rank)
    # the factors multiply out to `shape` (checked when the change was made, `ModuleDelta.of`)
    if delta.shape[0] != weight.shape[0] or math.prod(delta.shape) != weight.numel():
        return False
    parts = delta.parts
    if "bias" in parts and parts["bias"].numel() != weight.numel():
        return False
    if "dora_scale" in parts and parts["dora_scale"].numel() != weight.shape[1]:
        return False
    bias = delta.bias_delta()
    return bias is None or (layer.bias is not None and tuple(bias.shape) == tuple(layer.bias.shape))


def input_embedding_table(encoder: nn.Module) -> torch.Tensor:
    """A text encoder's token-embedding table [vocab, width] (the host wraps the embedding module in
    its EmbeddingsWithFixes, which keeps the original as `wrapped`)."""
    emb = encoder.get_input_embeddings()
    table = getattr(emb, "weight", None)
    return emb.wrapped.weight if table is None else table


def text_width(text_root: nn.Module) -> int:
    """How wide a concept's embedding row is for this text root: its one encoder's input width, or
    (SDXL's ModuleList of encoders) the widths of its encoders together, in order."""
    if hasattr(text_root, "get_input_embeddings"):
        return input_embedding_table(text_root).shape[1]
    return sum(text_width(encoder) for encoder in text_root)


def check_fits(concept: Concept, unet: nn.Module, text_encoder: nn.Module, *, embeddings: bool = True) -> None:
    """Every changed layer exists with matching shapes and (unless not `embeddings`: only the
    LoRA is used) the embedding width is the text width (`text_width`)."""
    what = concept.source_path or concept.name
    width = text_width(text_encoder) if embeddings and concept.tokens else None
    if width is not None and concept.dim != width:
        raise ConceptError(f"{what}: embeddings are {concept.dim} wide but the model's text encoder is {width} "
                           "(a concept for another model family?)")
    for root, lora in ((unet, concept.unet_lora), (text_encoder, concept.text_lora)):
        for name, f in lora.items():
            layer = _layer(root, name, what)
            if not _fits(f, layer):
                raise ConceptError(
                    f"{what}: the change of {name!r} ({f.shape}) does not fit the model's layer "
                    f"{tuple(layer.weight.shape)} (a LoRA for another model family?)")


def layer_change(delta: Delta, weight: torch.Tensor) -> torch.Tensor:
    """What `delta` adds to a layer whose weight is `weight`, in the host's arithmetic and
    compute dtype, shaped like the weight (multiplier 1)."""
    if isinstance(delta, LoraFactor):
        return delta.delta(torch.float32).to(weight.device).reshape(weight.shape)
    return delta.weight_delta(weight)


@contextmanager
def kept_aside(root: nn.Module, part: str, names: Sequence[str]) -> Iterator[None]:
    """The named modules' weights and biases may be changed in place within the block; a copy of
    each is kept aside and put back afterwards, bit for bit (`part` names the root for callers
    that re-read it from a file instead: `fusion.memory.Weights.changed`)."""
    saved = []
    for name in names:
        layer = root.get_submodule(name)
        for attr in ("weight", "bias"):
            param = getattr(layer, attr, None)
            if param is not None:
                saved.append((param, param.data))
                param.data = param.data.clone()
    try:
        yield
    finally:
        for param, original in saved:
            param.data = original


# what `applied` uses to get each changed layer back: (root, "unet" | "text", layer names)
Restorer = Callable[[nn.Module, str, Sequence[str]], AbstractContextManager]


@contextmanager
def applied(concepts: Iterable[tuple[Concept, float, float]], unet: nn.Module,
            text_encoder: nn.Module, restore: Restorer = kept_aside) -> Iterator[None]:
    """Add each (concept, unet weight, text weight)'s changes to the live weights (and biases) for
    the duration of the block, as the host's Lora adds them; afterwards every touched tensor is
    what it was, bit for bit. By default a copy of each changed layer is kept aside; a fusion on
    SDXL, where that copy is 1.2 GB, passes a `restore` that re-reads the layers from the file."""
    items = list(concepts)
    for concept, _, _ in items:
        check_fits(concept, unet, text_encoder)
    # per model part: its root and each concept's (LoRA of that part, weight)
    parts = ((unet, "unet", [(c.unet_lora, u) for c, u, _ in items]),
             (text_encoder, "text", [(c.text_lora, t) for c, _, t in items]))
    with ExitStack() as stack:
        for root, part, changes in parts:
            names = sorted({n for lora, w in changes if w != 0 for n in lora})
            if names:
                stack.enter_context(restore(root, part, names))
        with torch.no_grad():
            for root, _, changes in parts:
                for lora, w in changes:
                    if w == 0:
                        continue
                    for name, f in lora.items():
                        layer = root.get_submodule(name)
                        weight = layer.weight.data
                        change = layer_change(f, weight) * w
                        weight.copy_(weight.to(change.dtype) + change)
                        del change
                        extra = f.bias_delta()
                        if extra is not None:
                            layer.bias.data.copy_(layer.bias.data + extra.to(layer.bias.device) * w)
        yield
