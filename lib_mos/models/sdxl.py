"""SDXL topology: configs, model builders, conditioning, in the family's names (`family.SDXL`).

The host runs SDXL with Stability's `sgm` package, which is not on PyPI. Its UNet shares its
module and key names with `ldm`'s (input_blocks / middle_block / output_blocks, spatial
transformers with transformer_blocks.i.attn1/attn2, `label_emb.0.0/0.2` for the vector), so the
UNet here is the `ldm` UNetModel the SD1 code uses, built with SDXL's layout: three levels
(channel_mult 1, 2, 4), no attention at level 0, transformer depth 2 at level 1 and 10 at level 2
and in the middle block (70 attn2 layers), linear proj_in/proj_out, 64-channel heads, and the
`y` vector through `label_emb`. One difference is sgm's forward: every block of a spatial
transformer attends to the same context (ldm's indexes a list per block), which
`_SharedContextTransformer` restores.

The text side follows the host's conditioner: CLIP ViT-L (te1) and OpenCLIP ViT-bigG (te2), each
giving its penultimate hidden state; the two are concatenated into the [B, 77, 2048] context.
The vector is te2's pooled projection followed by Fourier features (256 each) of the original
size, crop corner and target size, [B, 2816]. te2 is built as transformers' CLIPTextModel with
a projection (the names kohya's `lora_te2_` keys use); the host holds it as open_clip's module,
which only the host glue needs to know.

Text LoRA module names of an SDXL model are rooted at `SDXLModel.text_root`, a ModuleList of the
two encoders: "0.text_model..." is te1 and "1.text_model..." is te2 (the host's embedder index).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lib_mos.models.family import SDXL
from lib_mos.models.sd1 import (
    _BOS_ID,
    _EOS_ID,
    _PAD_ID,
    _default_device,
    _plain_ldm_attention,
    _randomise,
    _skip_hf_init,
    check_positive_ints,
)

if TYPE_CHECKING:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextModel, CLIPTokenizer

__all__ = [
    "SDXL_BASE",
    "TINY_SDXL",
    "SDXLConfig",
    "SDXLModel",
    "build_sdxl_skeleton",
    "build_text_encoders",
    "build_tiny_sdxl",
    "build_unet",
    "load_checkpoint",
    "save_checkpoint",
    "size_embedding",
]

CONFIG_METADATA_KEY = "lib_mos.sdxl_config"


@dataclass(frozen=True)
class SDXLConfig:
    """Widths of an SDXL-topology model; defaults are SDXL base 1.0. Depths are fixed (70 attn2)."""

    model_channels: int = 320
    head_channels: int = 64
    te1_width: int = 768
    te1_layers: int = 12
    te1_heads: int = 12
    te1_intermediate: int = 3072
    te2_width: int = 1280
    te2_layers: int = 32
    te2_heads: int = 20
    te2_intermediate: int = 5120
    size_features: int = 256  # Fourier features per size number (6 numbers)
    vocab_size: int = 49408
    max_positions: int = 77

    def __post_init__(self) -> None:
        check_positive_ints(self)
        if self.model_channels % 32:
            raise ValueError(f"SDXLConfig.model_channels must be a multiple of 32, got {self.model_channels}")
        if self.model_channels % self.head_channels:
            raise ValueError("SDXLConfig.model_channels must be divisible by head_channels")
        if self.te1_width % self.te1_heads or self.te2_width % self.te2_heads:
            raise ValueError("SDXLConfig: text widths must be divisible by their head counts")
        if self.size_features % 2:
            raise ValueError("SDXLConfig.size_features must be even (cos and sin halves)")

    @property
    def context_dim(self) -> int:
        return self.te1_width + self.te2_width

    @property
    def vector_dim(self) -> int:
        return self.te2_width + 6 * self.size_features

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


SDXL_BASE = SDXLConfig()
TINY_SDXL = SDXLConfig(model_channels=32, head_channels=16, te1_width=32, te1_layers=2, te1_heads=4,
                       te1_intermediate=64, te2_width=48, te2_layers=2, te2_heads=4, te2_intermediate=96,
                       size_features=8)


class _SharedContextTransformer(nn.Module):
    """sgm's SpatialTransformer.forward: every transformer block attends to the one context."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        from einops import rearrange

        h, w = x.shape[-2:]
        x_in = x
        x = self.norm(x)
        x = rearrange(x, "b c h w -> b (h w) c").contiguous()
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous()
        return x + x_in


def build_unet(cfg: SDXLConfig, device: torch.device | str | None = None) -> UNetModel:
    """The ldm UNetModel in sd_xl_base.yaml's layout at cfg's widths (70 attn2, the `y` vector)."""
    import copy

    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with _plain_ldm_attention(), _default_device(device):
        unet = UNetModel(
            image_size=32,
            in_channels=4,
            out_channels=4,
            model_channels=cfg.model_channels,
            num_res_blocks=2,
            attention_resolutions=(2, 4),
            channel_mult=SDXL.channel_mult,
            num_head_channels=cfg.head_channels,
            use_spatial_transformer=True,
            use_linear_in_transformer=True,
            transformer_depth=1,
            context_dim=cfg.context_dim,
            use_checkpoint=False,
            legacy=False,
        )
        for name, module in unet.named_modules():
            if isinstance(module, SpatialTransformer):  # its depth: the family table's blocks under it
                depth = sum(attn2.startswith(f"{name}.transformer_blocks.") for attn2 in SDXL.attn2)
                first = module.transformer_blocks[0]
                module.transformer_blocks.extend(copy.deepcopy(first) for _ in range(depth - 1))
                module.__class__ = type("SpatialTransformer", (_SharedContextTransformer, SpatialTransformer), {})
        ted = cfg.model_channels * 4
        unet.num_classes = "sequential"
        unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.vector_dim, ted), nn.SiLU(), nn.Linear(ted, ted)))
    found = [n for n, _ in unet.named_modules() if n.endswith(".attn2")]
    if tuple(found) != SDXL.attn2:  # the family's table and the build must agree
        raise AssertionError(f"SDXL build has {len(found)} attn2 layers, not the family's {SDXL.layers}")
    return unet.eval()


def build_text_encoders(cfg: SDXLConfig, device: torch.device | str | None = None) -> nn.ModuleList:
    """[te1, te2]: CLIP ViT-L (quick_gelu) and OpenCLIP bigG (gelu, with its pooled projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(width: int, layers: int, heads: int, intermediate: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=width, intermediate_size=intermediate,
                              projection_dim=width, num_hidden_layers=layers, num_attention_heads=heads,
                              max_position_embeddings=cfg.max_positions, hidden_act=act, layer_norm_eps=1e-5,
                              bos_token_id=_BOS_ID, eos_token_id=_EOS_ID, pad_token_id=_PAD_ID)

    with _default_device(device), _skip_hf_init(device):
        te1 = CLIPTextModel(config(cfg.te1_width, cfg.te1_layers, cfg.te1_heads, cfg.te1_intermediate, "quick_gelu"))
        te2 = CLIPTextModelWithProjection(
            config(cfg.te2_width, cfg.te2_layers, cfg.te2_heads, cfg.te2_intermediate, "gelu"))
    return nn.ModuleList([te1, te2]).eval()


def size_embedding(values: torch.Tensor, features: int) -> torch.Tensor:
    """sgm's ConcatTimestepEmbedderND: each number of values [B, n] -> `features` Fourier features
    (cos half, then sin half, max period 10000), flattened to [B, n * features]."""
    half = features // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float().reshape(-1, 1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).reshape(values.shape[0], -1)


@dataclass
class SDXLModel:
    """An SDXL model as the project sees it outside the host."""

    unet: UNetModel
    text_root: nn.ModuleList  # [te1, te2]
    tokenizer: CLIPTokenizer | None
    alphas_cumprod: torch.Tensor
    config: SDXLConfig
    family = SDXL

    @property
    def text_encoders(self) -> tuple[CLIPTextModel, nn.Module]:
        return self.text_root[0], self.text_root[1]

    def encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(crossattn [B, T, D1 + D2], te2's pooled projection [B, P]) for token ids [B, T] (one
        77-chunk per row, EOS-padded as the host pads CLIP-L; OpenCLIP pads with 0 after the first
        EOS)."""
        te1, te2 = self.text_encoders
        ids = ids.to(next(te1.parameters()).device)
        eos = (ids == _EOS_ID).int().argmax(1, keepdim=True)
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        ids2 = torch.where(positions > eos, torch.zeros_like(ids), ids)
        h1 = te1(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        out2 = te2(input_ids=ids2, output_hidden_states=True)
        # the pooled vector sits at the EOS (transformers picks the argmax id, which 0-padding keeps)
        return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds

    def vector(self, pooled: torch.Tensor, width: int = 1024, height: int = 1024) -> torch.Tensor:
        """The UNet's `y` [B, V]: the pooled text [B, P] and the Fourier features of the original
        size, crop corner (0, 0) and target size, as the host's txt2img sets them."""
        sizes = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32,
                             device=pooled.device).expand(pooled.shape[0], -1)
        return torch.cat([pooled, size_embedding(sizes, self.config.size_features).to(pooled.dtype)], dim=1)

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor, width: int = 1024, height: int = 1024) -> dict[str, torch.Tensor]:
        """{"crossattn": [B, T, D1 + D2], "vector": [B, V]} for token ids [B, T] (`encode_text`)."""
        crossattn, pooled = self.encode_text(ids)
        return {"crossattn": crossattn, "vector": self.vector(pooled, width, height)}


def build_tiny_sdxl(seed: int = 0) -> SDXLModel:
    """A TINY_SDXL model with random weights depending only on `seed`; the global RNG is untouched."""
    from lib_mos.models.clip_tokenizer import load_clip_tokenizer
    from lib_mos.models.sd1 import sd1_alphas_cumprod

    with torch.random.fork_rng(devices=[]):
        unet = build_unet(TINY_SDXL)
        text_root = build_text_encoders(TINY_SDXL)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    _randomise(unet, gen)
    _randomise(text_root, gen)
    return SDXLModel(unet=unet.float().eval(), text_root=text_root.float().eval(), tokenizer=load_clip_tokenizer(),
                     alphas_cumprod=sd1_alphas_cumprod(), config=TINY_SDXL)


def build_sdxl_skeleton() -> SDXLModel:
    """Full-size SDXL base on the meta device: all names and shapes, no memory, no tokenizer."""
    with torch.random.fork_rng(devices=[]):
        unet = build_unet(SDXL_BASE, device="meta")
        text_root = build_text_encoders(SDXL_BASE, device="meta")
    return SDXLModel(unet=unet, text_root=text_root, tokenizer=None,
                     alphas_cumprod=torch.empty(1000, device="meta"), config=SDXL_BASE)


# ------------------------------------------------------------------------------------ checkpoint IO
# The host keeps te2 as OpenCLIP's text transformer (`conditioner.embedders.1.model.*`): fused q/k/v
# (`attn.in_proj_weight`), ln_1/ln_2, mlp.c_fc/c_proj, `positional_embedding`, and a
# `text_projection` applied as x @ P (transformers' Linear holds P transposed).
TE1_PREFIX = SDXL.text_encoders[0].checkpoint_prefix
TE2_PREFIX = SDXL.text_encoders[1].checkpoint_prefix
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def te2_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModelWithProjection state -> OpenCLIP's text keys, as SDXL files hold them."""
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].t(),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for ours, theirs in _OPENCLIP_LAYER.items():
            for part in ("weight", "bias"):
                out[f"{dst}{theirs}.{part}"] = state[f"{src}{ours}.{part}"]
        for part in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{part}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{part}"] for p in "qkv"])
    return out


def te2_from_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `te2_to_openclip` (logit_scale, which no prompt uses, is dropped)."""
    out = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
    }
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")})
    for i in layers:
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for ours, theirs in _OPENCLIP_LAYER.items():
            for part in ("weight", "bias"):
                out[f"{dst}{ours}.{part}"] = state[f"{src}{theirs}.{part}"]
        for part in ("weight", "bias"):
            for p, chunk in zip("qkv", state[f"{src}attn.in_proj_{part}"].chunk(3)):
                out[f"{dst}self_attn.{p}_proj.{part}"] = chunk
    return out


_TE2_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.embeddings.position_embedding.weight": "positional_embedding",
            "text_model.final_layer_norm.weight": "ln_final.weight",
            "text_model.final_layer_norm.bias": "ln_final.bias",
            "text_projection.weight": "text_projection"}  # stored transposed
_TE2_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def te2_file_key(name: str) -> tuple[str, int | None]:
    """Where te2's tensor `name` (a CLIPTextModelWithProjection state key) sits in the host's
    OpenCLIP layout: its key under TE2_PREFIX and, for q/k/v, which third of the stacked
    `attn.in_proj_*` rows (0, 1, 2) it is, so a reader or writer touches one file tensor at a
    time (`text_projection` is stored transposed). KeyError for a name te2 does not have."""
    if name in _TE2_TOP:
        return _TE2_TOP[name], None
    if m := _TE2_LAYER.fullmatch(name):
        i, module, part = m.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return f"transformer.resblocks.{i}.attn.in_proj_{part}", "qkv".index(module[len("self_attn.")])
        if module in _OPENCLIP_LAYER:
            return f"transformer.resblocks.{i}.{_OPENCLIP_LAYER[module]}.{part}", None
    raise KeyError(f"not a tensor of the SDXL bigG text encoder: {name}")


def checkpoint_tensors(model: SDXLModel, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The UNet and both text encoders in the host's SDXL key layout (`SDXL`'s prefixes)."""
    def cast(value: torch.Tensor) -> torch.Tensor:
        value = value.detach().cpu()
        return (value.to(dtype) if value.is_floating_point() else value).contiguous()

    te1, te2 = model.text_encoders
    tensors = {SDXL.unet_prefix + k: cast(v) for k, v in model.unet.state_dict().items()}
    tensors |= {TE1_PREFIX + k: cast(v) for k, v in te1.state_dict().items()}
    te2_state = {k: v for k, v in te2.state_dict().items() if not k.endswith("position_ids")}
    tensors |= {TE2_PREFIX + k: cast(v) for k, v in te2_to_openclip(te2_state).items()}
    return tensors


def save_checkpoint(model: SDXLModel, path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                    extra: Mapping[str, torch.Tensor] | None = None, overwrite: bool = False) -> Path:
    """Save in the host's SDXL .safetensors layout (`extra`: e.g. a VAE under first_stage_model.)."""
    from lib_mos.files import atomic_save_safetensors

    tensors = checkpoint_tensors(model, dtype) | dict(extra or {})
    return atomic_save_safetensors(tensors, path, metadata={CONFIG_METADATA_KEY: model.config.to_json()},
                                   overwrite=overwrite)


def load_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, unet: bool = True) -> SDXLModel:
    """Load an SDXL .safetensors checkpoint (host layout) into `dtype` models on `device`, tensor
    by tensor from plain file reads into the models' own memory (full size is 7 GB in fp16, 14 GB
    in fp32: the peak is the model plus one tensor, never the file or a float32 copy); every UNet
    and text key must be there with its shape (other keys, a VAE for one, are ignored). Widths come
    from the file's `lib_mos.sdxl_config` metadata, else SDXL base's. `unet=False`: the UNet's keys
    and shapes are checked, its weights stay on the meta device (`checkpoint_parts`)."""
    from lib_mos.models.clip_tokenizer import load_clip_tokenizer
    from lib_mos.models.sd1 import sd1_alphas_cumprod
    from lib_mos.tensorfile import TensorFile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with TensorFile(path) as handle:
        meta = handle.metadata
        if not any(k.startswith("conditioner.embedders.") for k in handle):
            raise ValueError(f"{path}: no 'conditioner.embedders.*' keys: not an SDXL checkpoint in the host's layout")
        config = SDXLConfig(**json.loads(meta[CONFIG_METADATA_KEY])) if CONFIG_METADATA_KEY in meta else SDXL_BASE
        with torch.random.fork_rng(devices=[]):
            unet_module = build_unet(config, device="meta").to(dtype)
            if unet:
                unet_module = unet_module.to_empty(device=device)
            text_root = build_text_encoders(config, device="meta").to(dtype).to_empty(device=device)

        def check(key: str, shape: tuple[int, ...]) -> None:
            if key not in handle:
                raise ValueError(f"{path}: missing key {key!r}")
            if handle.shape(key) != tuple(shape):
                raise ValueError(f"{path}: key {key!r} has shape {list(handle.shape(key))}, expected {list(shape)}")

        def fill(prefix: str, module: nn.Module, read: bool = True) -> None:
            targets = {k: v for k, v in module.state_dict(keep_vars=True).items() if not k.endswith("position_ids")}
            for key, target in targets.items():
                check(prefix + key, tuple(target.shape))
            for key, target in targets.items() if read else ():
                handle.read_into(prefix + key, target)

        te1, te2 = text_root
        fill(SDXL.unet_prefix, unet_module, read=unet)
        fill(TE1_PREFIX, te1)
        # te2: the file's OpenCLIP tensors, each read once (q/k/v: row thirds of one in_proj)
        groups: dict[str, list[tuple[int | None, torch.Tensor]]] = {}
        for name, target in te2.state_dict(keep_vars=True).items():
            if not name.endswith("position_ids"):
                key, third = te2_file_key(name)
                groups.setdefault(TE2_PREFIX + key, []).append((third, target))
        for key, targets in groups.items():
            shape = tuple(targets[0][1].shape)
            if targets[0][0] is not None:
                shape = (3 * shape[0], *shape[1:])
            check(key, shape[::-1] if key == TE2_PREFIX + "text_projection" else shape)
        with torch.no_grad():
            for key, targets in groups.items():
                if key == TE2_PREFIX + "text_projection":
                    targets[0][1].copy_(handle.read(key).t())
                elif targets[0][0] is None:
                    handle.read_into(key, targets[0][1])
                else:
                    stacked = handle.read(key).chunk(3)
                    for third, target in targets:
                        target.copy_(stacked[third])
                    del stacked
            for encoder in text_root:
                encoder.text_model.embeddings.position_ids.copy_(
                    torch.arange(config.max_positions, device=device).expand(1, -1))
    return SDXLModel(unet=unet_module.eval(), text_root=text_root.eval(), tokenizer=load_clip_tokenizer(),
                     alphas_cumprod=sd1_alphas_cumprod().to(device), config=config)
