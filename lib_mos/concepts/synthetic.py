"""Random concepts for the demo, tests and benchmarks (no training data or weights can be
downloaded here): ED-LoRA concepts with tokens, written in the authors' `.pth` layout, and
trigger-word LoRAs of the kinds users download (kohya LoRA / LoCon, LyCORIS LoHa), written in the
trainers' `.safetensors` layout with kohya's `ss_*` metadata."""

from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lib_mos.concepts.concept import Concept, LoraFactor, ModuleDelta, text_width, unet_ldm_to_diffusers
from lib_mos.models import sd1

if TYPE_CHECKING:
    from lib_mos.models.sdxl import SDXLModel


def random_concept(model: sd1.SD1Model | SDXLModel, tokens: tuple[str, ...] = ("<cat1>", "<cat2>"), *,
                   seed: int = 1, rank: int = 4, scale: float = 1.0, name: str | None = None,
                   unet_names: list[str] | None = None, text_names: list[str] | None = None) -> Concept:
    """An ED-LoRA-shaped concept for `model` (SD1 or SDXL): [n_tokens, L, D] embeddings (one row per
    attn2 layer, as wide as the text encoders' inputs together) and rank-`rank` LoRA on every
    attention linear (or the given subsets), deterministic in `seed`."""
    family = model.family
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(len(tokens), family.layers, text_width(model.text_root), generator=g) * 0.3

    def factor(lin: torch.nn.Linear) -> LoraFactor:
        return LoraFactor(torch.randn(rank, lin.in_features, generator=g) * 0.1,
                          torch.randn(lin.out_features, rank, generator=g) * 0.1, scale)

    if unet_names is None:
        unet_names = sd1.unet_attention_linear_names(family)
    if text_names is None:
        text_names = sd1.text_lora_linear_names(model)
    return Concept(name=name or tokens[0].strip("<>"), tokens=tuple(tokens), embeddings=emb,
                   unet_lora={n: factor(model.unet.get_submodule(n)) for n in unet_names},
                   text_lora={n: factor(model.text_root.get_submodule(n)) for n in text_names}, family=family)


def authors_params(concept: Concept, spelling: str = "main") -> dict[str, Any]:
    """The authors' `torch.save` layout: {'params': {'new_concept_embedding': {token: [16, D]},
    'text_encoder': {...}, 'unet': {...}}} with diffusers names, `main` spelling
    `<module>.lora_down.weight` or `research_branch` spelling `<module>_lora.down.weight`."""
    if spelling not in ("main", "research_branch"):
        raise ValueError(f"spelling must be 'main' or 'research_branch', got {spelling!r}")

    def keys(module: str, f: LoraFactor) -> dict[str, torch.Tensor]:
        if spelling == "main":
            return {f"{module}.lora_down.weight": f.down, f"{module}.lora_up.weight": f.up}
        return {f"{module}_lora.down.weight": f.down, f"{module}_lora.up.weight": f.up}

    unet: dict[str, torch.Tensor] = {}
    for name, f in concept.unet_lora.items():
        unet.update(keys(unet_ldm_to_diffusers(name), f))
    text: dict[str, torch.Tensor] = {}
    for name, f in concept.text_lora.items():
        text.update(keys(name, f))
    emb = {t: concept.token_rows(t).clone() for t in concept.tokens}
    return {"params": {"new_concept_embedding": emb, "text_encoder": text, "unet": unet}}


# Zip entries recent torch adds that torch 2.0 did not write (and the WebUI's pickle guard refuses).
_NEWER_ZIP_ENTRIES = (".format_version", ".storage_alignment")


def save_torch_file(obj: Any, path: str | os.PathLike[str], *, style: str = "current") -> None:
    """`torch.save(obj, path)`; `style="torch2.0"` writes the zip as torch 2.0/2.1 did, without the
    entries newer torch adds, and `style="newer"` always with them (whatever torch runs), so tests
    can cover files from both generations of users."""
    if style == "current":
        torch.save(obj, path)
        return
    if style not in ("torch2.0", "newer"):
        raise ValueError(f"style must be 'current', 'torch2.0' or 'newer', got {style!r}")
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        names = src.namelist()
        for info in src.infolist():
            if style == "newer" or not info.filename.endswith(_NEWER_ZIP_ENTRIES):
                dst.writestr(info, src.read(info))
        if style == "newer":  # what torch.save writes since it added these, even when the running torch (2.1) doesn't
            prefix = names[0].split("/", 1)[0]
            for entry, value in ((".format_version", "1"), (".storage_alignment", "64")):
                if f"{prefix}/{entry}" not in names:
                    dst.writestr(f"{prefix}/{entry}", value)


# ------------------------------------------------------------------ trigger-word LoRAs (kohya, LyCORIS)
LORA_KINDS = ("lora", "locon", "loha")  # kohya LoRA, kohya LoCon (conv_dim), LyCORIS LoHa
_TRANSFORMER_LAYER = re.compile(
    r".*\.transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
    r"|.*\.1\.proj_(in|out)")
_RESNET_CONV = re.compile(r"(input_blocks\.\d+\.0|middle_block\.[02]|output_blocks\.\d+\.0)\.(in_layers\.2|out_layers\.3)")


def lora_layer_names(model: sd1.SD1Model, kind: str = "locon") -> tuple[list[str], list[str]]:
    """(UNet, text-encoder) layers a kohya trainer changes, as ldm / transformers names: every
    text-encoder linear (attention and MLP), every transformer-block linear of the UNet (attn1,
    attn2, feed-forward) with proj_in / proj_out (1x1 convs in SD1), and for LoCon and LoHa
    (`conv_dim`) the resnets' 3x3 convs as well."""
    if kind not in LORA_KINDS:
        raise ValueError(f"kind must be one of {', '.join(LORA_KINDS)}, got {kind!r}")
    unet = [n for n, m in model.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and (_TRANSFORMER_LAYER.fullmatch(n) or (kind != "lora" and _RESNET_CONV.fullmatch(n)))]
    text = [n for n, m in model.text_root.named_modules() if isinstance(m, nn.Linear)
            and re.match(r"(\d\.)?text_model\.encoder\.layers\.", n)]
    return unet, text


def _lora_parts(weight: torch.Tensor, rank: int, strength: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """kohya LoRA / LoCon factors (alpha = rank: scale 1) whose change has about `strength` times the
    spread of a weight initialised with std 1/sqrt(fan_in)."""
    out, inp, *kernel = weight.shape
    fan_in = math.prod(weight.shape[1:])
    down = torch.randn(rank, inp, *kernel, generator=gen) / math.sqrt(fan_in)
    up = torch.randn(out, rank, *([1, 1] if kernel else []), generator=gen) * strength / math.sqrt(rank)
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(rank))}


def _loha_parts(weight: torch.Tensor, rank: int, strength: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """LyCORIS LoHa factors: (w1_a @ w1_b) * (w2_a @ w2_b) over the unfolded input, alpha = rank."""
    out, fan_in = weight.shape[0], math.prod(weight.shape[1:])
    std = (strength / math.sqrt(fan_in) / rank) ** 0.25
    parts = {}
    for i in (1, 2):
        parts[f"hada_w{i}_a"] = torch.randn(out, rank, generator=gen) * std
        parts[f"hada_w{i}_b"] = torch.randn(rank, fan_in, generator=gen) * std
    return parts | {"alpha": torch.tensor(float(rank))}


def random_lora_concept(model: sd1.SD1Model, kind: str = "locon", *, triggers: tuple[str, ...] = ("ohwx dog",),
                        seed: int = 1, rank: int = 4, conv_rank: int = 2, strength: float = 0.3,
                        name: str | None = None, unet_names: list[str] | None = None,
                        text_names: list[str] | None = None) -> Concept:
    """A trigger-word concept as `concept_files.read_concept` reads a LoRA file of `kind` (see
    LORA_KINDS): plain linear LoRA layers as `LoraFactor`, every other layer as a `ModuleDelta` with
    the file's parts; on `lora_layer_names(model, kind)` or the given subsets; deterministic in `seed`.
    3x3 convs get `conv_rank` (kohya's conv_dim)."""
    default_unet, default_text = lora_layer_names(model, kind)
    unet_names = default_unet if unet_names is None else unet_names
    text_names = default_text if text_names is None else text_names
    g = torch.Generator().manual_seed(seed)

    def change(layer: nn.Module) -> LoraFactor | ModuleDelta:
        w = layer.weight
        r = conv_rank if w.dim() == 4 and w.shape[2:] != (1, 1) else rank
        if kind == "loha":
            return ModuleDelta.of("loha", _loha_parts(w, r, strength, g))
        parts = _lora_parts(w, r, strength, g)
        if w.dim() == 2:
            return LoraFactor(parts["lora_down.weight"], parts["lora_up.weight"], float(parts["alpha"]) / r)
        return ModuleDelta.of("lora", parts)

    return Concept(name=name or triggers[0].replace(" ", "-"), tokens=(), embeddings=torch.zeros(0, model.family.layers, 0),
                   unet_lora={n: change(model.unet.get_submodule(n)) for n in unet_names},
                   text_lora={n: change(model.text_root.get_submodule(n)) for n in text_names},
                   triggers=tuple(triggers), family=model.family)


def kohya_key_stem(kind: str, name: str) -> str:
    """The key stem kohya's sd-scripts write for a layer (diffusers spelling):
    `lora_unet_down_blocks_0_attentions_0_proj_in`, `lora_unet_down_blocks_0_resnets_0_conv1`,
    `lora_te_text_model_encoder_layers_0_mlp_fc1`."""
    from lib_mos.concepts.files import RESNET_PARTS

    if kind == "text":
        return "lora_te_" + name.replace(".", "_")
    # RESNET_PARTS spells the ldm side as host layer keys (`in_layers_2`): dotted here
    diffusers_part = {re.sub(r"_(\d+)$", r".\1", ldm): part for part, ldm in RESNET_PARTS.items()}
    try:
        path = unet_ldm_to_diffusers(name)
    except KeyError:
        path = None
        if m := re.fullmatch(r"input_blocks\.(\d+)\.0\.(.+)", name):
            n = int(m[1])
            path = f"down_blocks.{(n - 1) // 3}.resnets.{(n - 1) % 3}.{diffusers_part[m[2]]}"
        elif m := re.fullmatch(r"middle_block\.([02])\.(.+)", name):
            path = f"mid_block.resnets.{int(m[1]) // 2}.{diffusers_part[m[2]]}"
        elif m := re.fullmatch(r"output_blocks\.(\d+)\.0\.(.+)", name):
            n = int(m[1])
            path = f"up_blocks.{n // 3}.resnets.{n % 3}.{diffusers_part[m[2]]}"
        if path is None:
            raise ValueError(f"no kohya key for UNet layer {name}") from None
    return "lora_unet_" + path.replace(".", "_")


def write_lora_file(concept: Concept, path: str | os.PathLike[str], *, tags: dict[str, dict[str, int]],
                    dtype: torch.dtype = torch.float16) -> Path:
    """`concept`'s LoRA as the trainers save it: kohya key stems (`kohya_key_stem`), each layer's
    parts (`lora_down.weight` / `lora_up.weight` / `alpha`, or LyCORIS' `hada_*`) in `dtype`, and
    kohya's `ss_*` metadata with `ss_tag_frequency` = `tags` ({dataset folder: {tag: count}}), where
    readers find a trigger word when the user gives none. No Mix-of-Show metadata: it reads as a
    plain kohya / LyCORIS file."""
    from safetensors.torch import save_file

    from lib_mos.concepts.files import layer_tensors

    tensors: dict[str, torch.Tensor] = {}
    kinds, ranks, conv_ranks = set(), set(), set()
    for kind, lora in (("unet", concept.unet_lora), ("text", concept.text_lora)):
        for module, f in lora.items():
            stem = kohya_key_stem(kind, module)
            layer = layer_tensors(stem, f)
            parts = {key.split(".", 1)[1]: t for key, t in layer.items()}
            kinds.add(f.kind if isinstance(f, ModuleDelta) else "lora")
            rank = int(parts["hada_w1_b"].shape[0] if "hada_w1_b" in parts else parts["lora_down.weight"].shape[0])
            is_conv = any(t.dim() == 4 and t.shape[2:] != (1, 1) for t in parts.values())
            (conv_ranks if is_conv else ranks).add(rank)
            tensors.update({key: t.to(dtype).contiguous() for key, t in layer.items()})
    lycoris = kinds != {"lora"}
    args = {"algo": "loha"} if "loha" in kinds else {}
    if conv_ranks:
        args |= {"conv_dim": str(max(conv_ranks)), "conv_alpha": str(max(conv_ranks))}
    metadata = {"ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
                "ss_network_dim": str(max(ranks, default=0)), "ss_network_alpha": str(max(ranks, default=0)),
                "ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_resolution": "(512, 512)",
                "ss_tag_frequency": json.dumps(tags)}
    if args:
        metadata["ss_network_args"] = json.dumps(args)
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    return path
