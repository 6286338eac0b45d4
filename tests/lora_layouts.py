"""LoRA files in the layouts the trainers write, shaped for a given model's real layers.

Each builder returns a `LoraFile` (tensors + safetensors metadata) for the layers of an SD1 or SDXL
model (`sd1.SD1Model`, `sdxl.SDXLModel`; text layers named from the model's text root), with random values from a seeded generator, scaled so every layer's change is a sizeable
fraction of its weight (its spread about 0.2 to 0.8 of the weight's):

- `kohya_lora`: kohya's `networks.lora` on the UNet transformer blocks (attn1/attn2 q, k, v,
  out.0, ff.net.0.proj, ff.net.2, as [r, in] / [out, r]) with proj_in/proj_out (1x1 convs in SD1:
  [r, in, 1, 1] / [out, r, 1, 1]) and the text encoder (self_attn q/k/v/out_proj, mlp fc1/fc2);
  `alpha` a scalar in the file's dtype, or absent.
- `kohya_locon`: the same plus `conv_dim`: resnet conv1/conv2 (3x3: [r, in, 3, 3] / [out, r, 1, 1]),
  conv_shortcut (1x1), time_emb_proj (linear), down/upsampler convs; `tucker=True` is LyCORIS'
  LoCon with a Tucker core on 3x3 kernels (down [r, in, 1, 1], `lora_mid.weight` [r, r, 3, 3]).
- `loha`: LyCORIS LoHa (`hada_w1_a` [out, r], `hada_w1_b` [r, in * kh * kw], same for w2, alpha);
  with `tucker=True` 3x3 convs get `hada_t1`/`hada_t2` [r, r, 3, 3] with `hada_w*_a` [r, out] and
  `hada_w*_b` [r, in].
- `lokr`: LyCORIS LoKr, out = a * c and in = b * d split near the square root: `lokr_w1` [a, b] whole
  with `lokr_w2_a` [c, r] / `lokr_w2_b` [r, d], or `lokr_w1_a` / `lokr_w1_b` with `lokr_w2` [c, d]
  whole (alternating by layer), 3x3 convs with `lokr_t2` [r, r, 3, 3] (`lokr_w2_a` [r, c],
  `lokr_w2_b` [r, d]).
- `full`: LyCORIS full (`diff` shaped like the weight, `diff_b` [out] on layers with a bias).
  LoHa, LoKr and full cover LoCon's layers plus conv_in, conv_out and the time embedding.
- `dora`: LyCORIS LoCon with `dora_wd`: LoRA factors plus `dora_scale`, the norm of each input
  column ([1, in] for a linear, [1, in, 1, 1] for a conv), as the host's apply_weight_decompose
  broadcasts it.
- `bias_diff`: LoRA layers with a weight-shaped `bias` part (added to up @ down before scaling).

Key spellings: "diffusers" (kohya: `lora_unet_down_blocks_0_attentions_0_...`,
`lora_unet_down_blocks_0_resnets_0_conv1`, `..._downsamplers_0_conv`, `lora_unet_mid_block_...`,
`lora_te_text_model_...`) and "ldm" (`lora_unet_input_blocks_1_0_in_layers_2`, ...,
`lora_te1_text_model_...`). SDXL files name their text layers `lora_te1_...` (CLIP-L) and
`lora_te2_...` (OpenCLIP bigG) in either spelling and carry `ss_base_model_version` sdxl_base_v1-0.
The diffusers names are written out here from the block layout (three blocks per level in both
families), independently of the reader under test.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lib_mos.models import sd1
from lib_mos.models.family import SD1, ModelFamily

Layer = tuple[str, str]  # ("unet" | "text", module name relative to the UNet / text encoder)
Parts = dict[str, torch.Tensor]

TAGS = {"10_ohwx dog": {"ohwx dog": 12, "grass": 3}}
_RESNET = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
           "skip_connection": "conv_shortcut"}
_RESNET_NAME = re.compile(r"(input_blocks\.\d+\.0|middle_block\.[02]|output_blocks\.\d+\.0)\."
                          r"(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)")
_SAMPLER_NAME = re.compile(r"input_blocks\.\d+\.0\.op|output_blocks\.\d+\.[12]\.conv")
_ATTN_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


@dataclass
class LoraFile:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    layers: list[Layer] = field(default_factory=list)  # the layers the file changes

    def save(self, folder: str | Path, name: str) -> Path:
        path = Path(folder) / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path), metadata=self.metadata or None)
        return path


def write_sidecar(lora: Path, activation_text: str, description: str = "a test LoRA") -> Path:
    """The host's per-LoRA user metadata (`<name>.json` next to the file, as its edit dialog saves it)."""
    path = lora.with_suffix(".json")
    path.write_text(json.dumps({"description": description, "sd version": "SD1", "activation text": activation_text,
                                "preferred weight": 0, "negative text": "", "notes": ""}, indent=4))
    return path


def kohya_metadata(module: str = "networks.lora", dim: int | str = 4, alpha: float | str | None = 2.0,
                   tags: dict | None = None, base: str = "sd_v1", args: dict | None = None) -> dict[str, str]:
    """The `ss_*` metadata kohya's sd-scripts (and LyCORIS through it) write."""
    meta = {"ss_network_module": module, "ss_network_dim": str(dim),
            "ss_network_alpha": str(alpha if alpha is not None else dim), "ss_base_model_version": base,
            "ss_v2": "False", "ss_resolution": "(512, 512)", "ss_num_train_images": "15",
            "ss_tag_frequency": json.dumps(TAGS if tags is None else tags)}
    if args is not None:
        meta["ss_network_args"] = json.dumps(args)
    return meta


# ------------------------------------------------------------------------------------ layer names
def module(model: sd1.SD1Model, layer: Layer) -> nn.Linear | nn.Conv2d:
    return (model.unet if layer[0] == "unet" else model.text_root).get_submodule(layer[1])


def _layers(root: nn.Module, kind: str, keep: Callable[[str, nn.Module], bool]) -> list[Layer]:
    return [(kind, n) for n, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and keep(n, m)]


def attention_layers(model: sd1.SD1Model) -> list[Layer]:
    """The transformer blocks' linears and proj_in / proj_out (1x1 convs in SD1)."""
    return _layers(model.unet, "unet", lambda n, m: n.endswith(_ATTN_LINEARS) or n.endswith((".proj_in", ".proj_out")))


def text_layers(model: sd1.SD1Model) -> list[Layer]:
    """Every linear of the encoder layers (SDXL's te2 projection is no layer kohya trains)."""
    return _layers(model.text_root, "text", lambda n, m: isinstance(m, nn.Linear) and ".encoder.layers." in n)


def resnet_layers(model: sd1.SD1Model) -> list[Layer]:
    """conv1 / conv2 (3x3), conv_shortcut (1x1), time_emb_proj (linear) of every resnet."""
    return _layers(model.unet, "unet", lambda n, m: bool(_RESNET_NAME.fullmatch(n)))


def sampler_layers(model: sd1.SD1Model) -> list[Layer]:
    """The downsamplers' and upsamplers' 3x3 convs."""
    return _layers(model.unet, "unet", lambda n, m: bool(_SAMPLER_NAME.fullmatch(n)))


def outer_layers(model: sd1.SD1Model) -> list[Layer]:
    """conv_in, conv_out and the embedding MLPs' linears (LyCORIS' "full" preset trains them): the
    time embedding, and SDXL's vector embedding (`label_emb`)."""
    return _layers(model.unet, "unet", lambda n, m: n in ("input_blocks.0.0", "out.2", "time_embed.0", "time_embed.2",
                                                          "label_emb.0.0", "label_emb.0.2"))


def diffusers_path(name: str) -> str:
    """An ldm UNet layer name -> its diffusers (kohya) path, from SD1's block layout: input_blocks
    n = 1..11 belong to down_blocks i = (n-1) // 3 as resnet / attention j = (n-1) % 3, except the
    downsampler (j = 2); output_blocks n belong to up_blocks n // 3 as resnet / attention n % 3, the
    upsampler being module 1 of output_blocks 2 and module 2 of 5 and 8; middle_block 0 / 2 are
    mid_block's resnets 0 / 1 around its attention (1)."""
    fixed = {"input_blocks.0.0": "conv_in", "out.2": "conv_out", "time_embed.0": "time_embedding.linear_1",
             "time_embed.2": "time_embedding.linear_2"}
    if name in fixed:
        return fixed[name]
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", name):
        n, rest = int(m[1]), m[2]
        return f"mid_block.attentions.0.{rest}" if n == 1 else f"mid_block.resnets.{n // 2}.{_RESNET[rest]}"
    m = re.fullmatch(r"(input|output)_blocks\.(\d+)\.(\d)\.(.+)", name)
    assert m is not None, name
    n, sub, rest = int(m[2]), m[3], m[4]
    if m[1] == "input":
        block, i, j = "down_blocks", (n - 1) // 3, (n - 1) % 3
        if rest == "op":
            return f"down_blocks.{i}.downsamplers.0.conv"
    else:
        block, i, j = "up_blocks", n // 3, n % 3
        if rest == "conv":
            return f"up_blocks.{i}.upsamplers.0.conv"
    return f"{block}.{i}.attentions.{j}.{rest}" if sub == "1" else f"{block}.{i}.resnets.{j}.{_RESNET[rest]}"


def key_stem(layer: Layer, spelling: str, family: ModelFamily = SD1) -> str:
    """SDXL files (kohya writes ldm names for SDXL) get the diffusers spelling on attention blocks
    only: the host converts SDXL's other diffusers names with SD1's block layout, wrongly for the
    first upsampler (tested in test_lora_kinds)."""
    kind, name = layer
    if kind == "text":
        if family is not SD1:
            root = next(e for e in family.text_encoders if name.startswith(e.root))
            return root.lora_prefix + name[len(root.root):].replace(".", "_")
        return ("lora_te_" if spelling == "diffusers" else "lora_te1_") + name.replace(".", "_")
    diffusers = spelling == "diffusers" and (family is SD1 or bool(re.match(r"\w+_blocks\.\d+\.1\.|middle_block\.1\.", name)))
    return "lora_unet_" + (diffusers_path(name) if diffusers else name).replace(".", "_")


# ----------------------------------------------------------------------------------- layer parts
def _normal(gen: torch.Generator, shape: Iterable[int], std: float) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _fan_in(shape: torch.Size) -> int:
    return math.prod(shape[1:])


def lora_parts(shape: torch.Size, rank: int, gen: torch.Generator, tucker: bool = False) -> Parts:
    """kohya LoRA / LoCon factors for a weight of `shape` (linear [out, in], conv [out, in, kh, kw])."""
    out, inp, *kernel = shape
    weight_std = 1 / math.sqrt(_fan_in(shape))
    up = _normal(gen, (out, rank, *([1, 1] if kernel else [])), 0.5 / math.sqrt(rank))
    if tucker and kernel and kernel != [1, 1]:
        down = _normal(gen, (rank, inp, 1, 1), 1 / math.sqrt(inp))
        mid = _normal(gen, (rank, rank, *kernel), 1 / (math.sqrt(math.prod(kernel)) * math.sqrt(rank)))
        return {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}
    down = _normal(gen, (rank, inp, *kernel), weight_std)
    return {"lora_down.weight": down, "lora_up.weight": up}


def loha_parts(shape: torch.Size, rank: int, gen: torch.Generator, tucker: bool = False) -> Parts:
    out, inp, *kernel = shape
    target = 0.5 / math.sqrt(_fan_in(shape))
    parts: Parts = {}
    for i in (1, 2):
        if tucker and kernel and kernel != [1, 1]:
            std = (target / rank ** 2) ** (1 / 6)
            parts |= {f"hada_w{i}_a": _normal(gen, (rank, out), std), f"hada_w{i}_b": _normal(gen, (rank, inp), std),
                      f"hada_t{i}": _normal(gen, (rank, rank, *kernel), std)}
        else:
            std = (target / rank) ** 0.25
            parts |= {f"hada_w{i}_a": _normal(gen, (out, rank), std),
                      f"hada_w{i}_b": _normal(gen, (rank, inp * math.prod(kernel)), std)}
    return parts


def _split(n: int) -> tuple[int, int]:
    """n = small * large with small the largest divisor up to sqrt(n) (LyCORIS' factorization)."""
    small = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return small, n // small


def lokr_parts(shape: torch.Size, rank: int, gen: torch.Generator, whole_w1: bool = True) -> Parts:
    out, inp, *kernel = shape
    (a, c), (b, d) = _split(out), _split(inp)
    target = 0.2 / math.sqrt(_fan_in(shape))  # alpha / r is 1.5 here
    if kernel and kernel != [1, 1]:  # w1 whole, w2 Tucker-decomposed around lokr_t2
        std = (target / rank) ** (1 / 3)
        return {"lokr_w1": _normal(gen, (a, b), 1.0), "lokr_w2_a": _normal(gen, (rank, c), std),
                "lokr_w2_b": _normal(gen, (rank, d), std), "lokr_t2": _normal(gen, (rank, rank, *kernel), std)}
    r = min(rank, a, b, c, d)
    if whole_w1:
        std = (target / math.sqrt(r)) ** 0.5
        return {"lokr_w1": _normal(gen, (a, b), 1.0), "lokr_w2_a": _normal(gen, (c, r), std),
                "lokr_w2_b": _normal(gen, (r, d), std)}
    std = (target / math.sqrt(r)) ** 0.5
    return {"lokr_w1_a": _normal(gen, (a, r), std), "lokr_w1_b": _normal(gen, (r, b), std),
            "lokr_w2": _normal(gen, (c, d), 1.0)}


# -------------------------------------------------------------------------------------- builders
_SAMPLE = re.compile(r"(input_blocks\.[0134]|middle_block|output_blocks\.[258]|out|time_embed|label_emb)\.|"
                     r"(\d\.)?text_model\.encoder\.layers\.(0|11)\.")


def sample(layers: list[Layer]) -> list[Layer]:
    """A few blocks with every layer type in them (attention linears and proj convs at two widths,
    resnets with and without conv_shortcut, a downsampler, both kinds of upsampler, the middle
    block, conv_in / conv_out / time embedding, the first and last text-encoder layers): a file as
    a trainer writes it, on fewer layers."""
    return [layer for layer in layers if _SAMPLE.match(layer[1])]


def _build(model: sd1.SD1Model, layers: list[Layer], make: Callable[[int, Layer, nn.Module], Parts], *,
           spelling: str, dtype: torch.dtype, metadata: dict[str, str], few: bool) -> LoraFile:
    """The file's tensors in `dtype`, keyed in `spelling`; `few`: only the `sample` layers."""
    layers = sample(layers) if few else layers
    if model.family is not SD1:
        metadata = {**metadata, "ss_base_model_version": "sdxl_base_v1-0"}
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        stem = key_stem(layer, spelling, model.family)
        for part, value in make(i, layer, module(model, layer)).items():
            tensors[f"{stem}.{part}"] = value.to(dtype)
    return LoraFile(tensors, metadata, list(layers))


def _alpha(value: float | None) -> Parts:
    return {} if value is None else {"alpha": torch.tensor(float(value))}


def kohya_lora(model: sd1.SD1Model, *, spelling: str = "diffusers", dtype: torch.dtype = torch.float16,
               rank: int = 4, alpha: float | None = 2.0, seed: int = 0, few: bool = False) -> LoraFile:
    gen = torch.Generator().manual_seed(seed)
    layers = attention_layers(model) + text_layers(model)
    return _build(model, layers, lambda i, layer, m: lora_parts(m.weight.shape, rank, gen) | _alpha(alpha),
                  spelling=spelling, dtype=dtype, metadata=kohya_metadata(dim=rank, alpha=alpha), few=few)


def kohya_locon(model: sd1.SD1Model, *, spelling: str = "diffusers", dtype: torch.dtype = torch.float16,
                rank: int = 4, alpha: float = 2.0, conv_rank: int = 2, conv_alpha: float = 3.0, tucker: bool = False,
                seed: int = 1, few: bool = False) -> LoraFile:
    """kohya LoCon (`conv_dim`): 3x3 convs at conv_rank/conv_alpha; `tucker`: LyCORIS LoCon's Tucker core."""
    gen = torch.Generator().manual_seed(seed)

    def make(i: int, layer: Layer, m: nn.Module) -> Parts:
        three = isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)
        r, a = (conv_rank, conv_alpha) if three else (rank, alpha)
        return lora_parts(m.weight.shape, r, gen, tucker=tucker) | _alpha(a)

    layers = attention_layers(model) + resnet_layers(model) + sampler_layers(model) + text_layers(model)
    meta = kohya_metadata(module="lycoris.kohya" if tucker else "networks.lora", dim=rank, alpha=alpha,
                          args={"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha),
                                **({"algo": "locon", "use_tucker": "True"} if tucker else {})})
    return _build(model, layers, make, spelling=spelling, dtype=dtype, metadata=meta, few=few)


def _lycoris_layers(model: sd1.SD1Model) -> list[Layer]:
    return attention_layers(model) + resnet_layers(model) + sampler_layers(model) + outer_layers(model) + text_layers(model)


def loha(model: sd1.SD1Model, *, spelling: str = "diffusers", dtype: torch.dtype = torch.float32, rank: int = 4,
         alpha: float = 2.0, tucker: bool = False, seed: int = 2, few: bool = False) -> LoraFile:
    gen = torch.Generator().manual_seed(seed)
    meta = kohya_metadata(module="lycoris.kohya", dim=rank, alpha=alpha,
                          args={"algo": "loha", "conv_dim": str(rank), "conv_alpha": str(alpha), "use_tucker": str(tucker)})
    return _build(model, _lycoris_layers(model),
                  lambda i, layer, m: loha_parts(m.weight.shape, rank, gen, tucker) | _alpha(alpha),
                  spelling=spelling, dtype=dtype, metadata=meta, few=few)


def lokr(model: sd1.SD1Model, *, spelling: str = "diffusers", dtype: torch.dtype = torch.float32, rank: int = 2,
         alpha: float = 3.0, seed: int = 3, few: bool = False) -> LoraFile:
    gen = torch.Generator().manual_seed(seed)
    meta = kohya_metadata(module="lycoris.kohya", dim=rank, alpha=alpha, args={"algo": "lokr", "factor": "-1"})
    return _build(model, _lycoris_layers(model),
                  lambda i, layer, m: lokr_parts(m.weight.shape, rank, gen, whole_w1=i % 2 == 0) | _alpha(alpha),
                  spelling=spelling, dtype=dtype, metadata=meta, few=few)


def full(model: sd1.SD1Model, *, spelling: str = "diffusers", dtype: torch.dtype = torch.float32,
         seed: int = 4, few: bool = False) -> LoraFile:
    gen = torch.Generator().manual_seed(seed)

    def make(i: int, layer: Layer, m: nn.Module) -> Parts:
        parts = {"diff": _normal(gen, m.weight.shape, 0.5 / math.sqrt(_fan_in(m.weight.shape)))}
        if m.bias is not None:
            parts["diff_b"] = _normal(gen, m.bias.shape, 0.1)
        return parts

    meta = kohya_metadata(module="lycoris.kohya", dim="full", alpha=None, args={"algo": "full"})
    return _build(model, _lycoris_layers(model), make, spelling=spelling, dtype=dtype, metadata=meta, few=few)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column over everything else: [1, in] (linear), [1, in, 1, 1] (conv)."""
    norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1, keepdim=True)
    return norm.reshape(weight.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)


def dora(model: sd1.SD1Model, *, spelling: str = "diffusers", dtype: torch.dtype = torch.float16, rank: int = 4,
         alpha: float = 2.0, seed: int = 5, few: bool = False) -> LoraFile:
    """LyCORIS LoCon with weight decomposition: `dora_scale` starts as the weight's column norms and
    is trained from there (here: perturbed by up to about 20%)."""
    gen = torch.Generator().manual_seed(seed)

    def make(i: int, layer: Layer, m: nn.Module) -> Parts:
        w = m.weight.detach()
        scale = column_norms(w) * (1 + 0.2 * torch.rand(column_norms(w).shape, generator=gen))
        return lora_parts(w.shape, rank, gen) | _alpha(alpha) | {"dora_scale": scale}

    layers = attention_layers(model) + resnet_layers(model) + text_layers(model)
    meta = kohya_metadata(module="lycoris.kohya", dim=rank, alpha=alpha, args={"algo": "locon", "dora_wd": "True"})
    return _build(model, layers, make, spelling=spelling, dtype=dtype, metadata=meta, few=few)


def bias_diff(model: sd1.SD1Model, *, spelling: str = "diffusers", dtype: torch.dtype = torch.float32,
              rank: int = 4, alpha: float = 2.0, seed: int = 6, few: bool = False) -> LoraFile:
    """LoRA layers that also carry a weight-shaped `bias` part (the host adds it to up @ down)."""
    gen = torch.Generator().manual_seed(seed)

    def make(i: int, layer: Layer, m: nn.Module) -> Parts:
        shape = m.weight.shape
        return lora_parts(shape, rank, gen) | _alpha(alpha) | {
            "bias": _normal(gen, shape, 0.5 / math.sqrt(_fan_in(shape)))}

    layers = attention_layers(model) + resnet_layers(model) + text_layers(model)
    return _build(model, layers, make, spelling=spelling, dtype=dtype,
                  metadata=kohya_metadata(module="lycoris.kohya", dim=rank, alpha=alpha), few=few)
