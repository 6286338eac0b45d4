"""Concept files: read the authors' ED-LoRA `.pth`, every LoRA file the host's Lora applies to SD1
(kohya LoRA / LoCon, LyCORIS LoHa, LoKr, full diffs, DoRA; alone as a trigger-word concept or with
a textual-inversion embedding) and our own `.safetensors` format into `lib_mos.concepts.Concept`;
write our format.

Our format is one `.safetensors` file that is at the same time an ordinary kohya LoRA, so the
host's built-in Lora (`<lora:name:1>`) applies its weights when the file sits in `models/Lora`,
while the layer-wise embeddings ride along under a private key prefix the host cannot match (it
only debug-logs such keys) and the concept's description sits in the safetensors metadata.

Every reader validates the whole file and builds the complete Concept before returning it, and
every problem is a `ConceptError` whose message names the file (and the key, where there is one):
a user with a dozen concept files needs to know which one is broken and why, not a traceback.
Pickles are only ever opened with `torch_load_weights` (`weights_only=True`, past the host's guard).

Choices (see also the module constants):
- A LoRA file's keys are resolved to layers as the host resolves them for SD1 (kohya's diffusers
  spelling, ldm spelling, `lora_te1_`), and every key must reach a Linear or Conv2d: the host
  skips keys it cannot match, but a concept silently missing half its weights looks plausible and
  is wrong, so such a file (SDXL, unknown layers, norm/IA3/OFT kinds) is refused naming the key.
- Plain linear LoRAs and embeddings are returned as independent float32 copies (fp16/bf16 files
  upcast losslessly); other layer kinds keep the file's tensors and dtype (`ModuleDelta`), so they
  rebuild with the host's own arithmetic.
- Trigger words of a LoRA without embeddings: given (`trigger=`), else the host's sidecar
  `<file>.json` "activation text", else the most frequent tag of the file's `ss_tag_frequency`.
- A textual-inversion embedding with n vectors becomes n tokens (`<base>` for one vector,
  `<base1>` ... `<baseN>` for several, mirroring the authors' `<potter1> <potter2>`), each with
  the same row on every layer; `base` is `name` or the embedding file's stem, without `<>`.
- Token names must be non-empty and free of whitespace and of the host's prompt syntax characters
  `()[]{}:|\\,`, because binding is a plain string replace inside prompts the host also parses.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lib_mos.concepts.concept import (
    KIND_PARTS,
    SHARED_PARTS,
    Concept,
    ConceptError,
    LoraFactor,
    ModuleDelta,
    check_fits,
    delta_kind,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
)
from lib_mos.files import atomic_save_safetensors
from lib_mos.models import sd1
from lib_mos.models.family import FAMILIES, SD1, ModelFamily, family_named, family_of_lora_metadata
from lib_mos.models.unet_layers import unet_layers

__all__ = [
    "EMBEDDING_PREFIX",
    "FORMAT",
    "METADATA_KEY",
    "VERSION",
    "check_against_model",
    "check_concept_set",
    "family_of_file",
    "read_concept",
    "sha256_file",
    "torch_load_weights",
    "write_concept",
]

FORMAT = "mos-concept"
VERSION = 3  # 2: trigger-word concepts and every layer kind the host's Lora applies; 3: "family"
READABLE_VERSIONS = (1, 2, 3)  # before 3 every concept was SD1
METADATA_KEY = "mos_concept"
EMBEDDING_PREFIX = "mos_concept.embedding."
# what a user calls each family a file may say it is for (SD2 is read, never supported)
FAMILY_LABELS = {**{name: family.label for name, family in FAMILIES.items()}, "sd2": "SD2.x"}
_FORBIDDEN_TOKEN_CHARS = set("()[]{}:|\\,")
_PTH_SECTIONS = ("new_concept_embedding", "text_encoder", "unet")
# The authors' LoRA parameter names: `main` has `<module>.lora_down.weight`, `research_branch` has
# `<module>_lora.down.weight`; neither stores alpha (their LoRALinearLayer keeps it in a buffer that
# delta_state_dict skips), but accept it if present with their meaning (scale = alpha, no /rank).
# Longest suffix first so `_lora.alpha` is not read as module `x_lora` + `.alpha`.
_PTH_SUFFIXES = (
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    ("_lora.alpha", "alpha"),
    (".alpha", "alpha"),
)
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# How torch (2.1 ... 2.13) words "this pickle imports something that is not allowlisted".
_CODE_MARKERS = ("GLOBAL", "global", "Unsupported class", "allowlisted")
_SCAN_LIMIT = 1 << 24  # bytes of pickle examined to name a refused import


# ------------------------------------------------------------------------------------------- helpers
def _squash(text: str) -> str:
    """One short line: messages end up on the CLI's single stderr line."""
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _one_line(exc: BaseException) -> str:
    return _squash(str(exc)) or type(exc).__name__


def _is_interrupt(exc: BaseException) -> bool:
    return isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed so multi-GB files do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _linear_targets(kind: str, family: ModelFamily = SD1) -> frozenset[str]:
    """Module names of every linear layer of the UNet ("unet") or text encoder ("text")."""
    return frozenset(name for k, name, conv in _layer_table(family).values() if k == kind and not conv)


# te2 (OpenCLIP bigG) layers the host's Lora reaches: kohya's `lora_te2_text_model_encoder_layers_N_*`
# becomes `1_model_transformer_resblocks_N_*` (self_attn -> attn, mlp_fc1/fc2 -> mlp_c_fc/c_proj);
# q/k/v live in one fused in_proj there.
_TE2_LAYER = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")


@functools.cache
def _layer_table(family: ModelFamily = SD1) -> dict[str, tuple[str, str, bool]]:
    """The host's Lora layer key of every Linear and Conv2d of a `family` model -> ("unet" | "text",
    module name, is a conv). The host names layers by their dotted path with `_`
    (`diffusion_model_input_blocks_1_1_proj_in`, `transformer_text_model_encoder_layers_0_mlp_fc1`;
    SDXL: `0_transformer_text_model_...` for te1); underscores in names are ambiguous, so keys are
    looked up, never split. te2 of SDXL is keyed by kohya's own stem (`lora_te2_text_model_...`),
    which the host maps onto OpenCLIP's modules. The UNet's layers are the shipped list
    (`models.unet_layers`: no ldm needed, which Forge lacks); the text encoders' are read off
    transformers models on the meta device (the layer names do not depend on the widths, only on
    the layer counts, which are the full-size model's); text module names are rooted at the model's
    text root."""
    from torch import nn

    from lib_mos.models import sdxl

    if family is SD1:
        texts = [("transformer_", "", sd1.build_text_encoder(sd1.TINY_SD1, device="meta"))]
    else:
        # the full-size layer counts (12 and 32 text layers) at the tiny widths: names, not shapes
        names = dataclasses.replace(sdxl.TINY_SDXL, te1_layers=sdxl.SDXL_BASE.te1_layers,
                                    te2_layers=sdxl.SDXL_BASE.te2_layers)
        te1, te2 = sdxl.build_text_encoders(names, device="meta")
        texts = [("0_transformer_", "0.", te1), ("lora_te2_", "1.", te2)]
    table: dict[str, tuple[str, str, bool]] = {}
    for name, conv in unet_layers(family).items():
        table["diffusion_model_" + name.replace(".", "_")] = ("unet", name, conv)
    for key_prefix, root, encoder in texts:
        for name, module in encoder.named_modules():
            if isinstance(module, nn.Linear) and (key_prefix != "lora_te2_" or _TE2_LAYER.fullmatch(name)):
                table[key_prefix + name.replace(".", "_")] = ("text", root + name, False)
    return table


RESNET_PARTS = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                 "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_DIFFUSERS_STEMS = (
    # (pattern, how the SD1 ldm layer key follows from its groups), as the host converts kohya's
    # diffusers spelling (extensions-builtin/Lora/networks.py, convert_diffusers_name_to_compvis)
    (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
    (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{_block(m[2], m[4])}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{_block(m[1], m[3])[2:]}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{_block(m[2], m[4])}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
     lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
    (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
)


def _block(kind: str, rest: str) -> str:
    """`1_<rest>` inside an attention block, `0_<ldm part>` inside a resnet."""
    return f"1_{rest}" if kind == "attentions" else f"0_{RESNET_PARTS.get(rest, rest)}"


def _resolve_stem(stem: str, family: ModelFamily = SD1) -> tuple[str, str, bool] | None:
    """A LoRA key stem -> ("unet" | "text", module name, is a conv), resolved as the host resolves it
    for `family`: kohya's diffusers spelling, else ldm spelling (`lora_unet_input_blocks_...`), else
    `lora_te1_text_model_...` (SDXL: te1, SD1: its one encoder), SDXL's `lora_te2_...`; None when
    the host would match no layer either."""
    table = _layer_table(family)
    key = stem
    for pattern, convert in _DIFFUSERS_STEMS:
        if m := re.fullmatch(pattern, stem):
            key = convert(m)
            break
    found = table.get(key)
    if found is None and "lora_unet" in stem:
        found = table.get(stem.replace("lora_unet", "diffusion_model"))
    elif found is None and "lora_te1_text_model" in stem:
        found = (table.get(stem.replace("lora_te1_text_model", "0_transformer_text_model"))
                 or table.get(stem.replace("lora_te1_text_model", "transformer_text_model")))
    elif found is None and stem.startswith("lora_te2_"):
        found = table.get(stem)
    return found


def _kohya_name(kind: str, name: str, family: ModelFamily = SD1) -> str:
    """The key stem our writer uses: kohya's diffusers spelling for SD1 attention-block layers (the
    host's primary path), the ldm spelling for the others and for SDXL (kohya's own SDXL keys);
    text layers with their encoder's prefix (SDXL: "0." -> lora_te1_, "1." -> lora_te2_)."""
    if kind == "unet":
        if family is SD1:
            try:
                return "lora_unet_" + unet_ldm_to_diffusers(name).replace(".", "_")
            except KeyError:
                pass
        return "lora_unet_" + name.replace(".", "_")
    for encoder in family.text_encoders:
        if name.startswith(encoder.root):
            return encoder.lora_prefix + name[len(encoder.root):].replace(".", "_")
    raise ConceptError(f"text module {name!r} belongs to no text encoder of {family.label}")


def _float_tensor(value: Any, where: str, key: str, ndim: int | tuple[int, ...]) -> torch.Tensor:
    """A finite float tensor of the given rank, as an independent float32 copy."""
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if not isinstance(value, torch.Tensor):
        raise ConceptError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
    if not value.is_floating_point():
        raise ConceptError(f"{where}: {key!r} has dtype {value.dtype}, expected floating point")
    if value.dim() not in dims:
        raise ConceptError(f"{where}: {key!r} has shape {list(value.shape)}, expected {dims[0]} dimensions")
    out = value.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise ConceptError(f"{where}: {key!r} contains NaN or Inf values")
    return out


def _check_token(token: Any, where: str) -> str:
    if not isinstance(token, str) or not token:
        raise ConceptError(f"{where}: concept token {token!r} is not a non-empty string")
    bad = sorted({c for c in token if c.isspace() or c in _FORBIDDEN_TOKEN_CHARS})
    if bad:
        raise ConceptError(
            f"{where}: concept token {token!r} contains {''.join(bad)!r}; tokens may not contain "
            "whitespace or the prompt syntax characters ()[]{}:|\\, (pass another name)")
    return token


def _check_embeddings(tokens: tuple[str, ...], rows: list[torch.Tensor], layers: int, where: str) -> torch.Tensor:
    """[n_tokens, layers, D] from per-token [layers, D] rows: one width, the right layer count."""
    if not tokens:
        raise ConceptError(f"{where}: the concept has no tokens")
    if len(set(tokens)) != len(tokens):
        raise ConceptError(f"{where}: a concept token is listed twice: {list(tokens)}")
    for token, row in zip(tokens, rows):
        if row.shape[0] != layers:
            hint = " (trained without layer-wise embeddings, enable_edlora: false?)" if row.shape[0] == 1 else ""
            raise ConceptError(
                f"{where}: embedding of {token!r} has {row.shape[0]} layer rows, expected {layers}, one per "
                f"cross-attention layer{hint}")
        if row.shape[1] != rows[0].shape[1]:
            raise ConceptError(
                f"{where}: embedding of {token!r} is {row.shape[1]} wide but {tokens[0]!r} is "
                f"{rows[0].shape[1]} wide")
        if row.shape[1] == 0:
            raise ConceptError(f"{where}: embedding of {token!r} is empty")
    return torch.stack(rows)


def _factor(parts: Mapping[str, tuple[str, Any]], where: str, alpha_is_scale: bool) -> LoraFactor:
    """One LoraFactor from {"down" | "up" | "alpha": (file key, value)}; errors name the exact key."""
    for part, partner in (("down", "up"), ("up", "down")):
        if part not in parts:
            raise ConceptError(
                f"{where}: LoRA key {parts[partner][0]!r}: its {part} weight is missing (a LoRA needs both)")
    down_key, up_key = parts["down"][0], parts["up"][0]
    down = _float_tensor(parts["down"][1], where, down_key, 2)
    up = _float_tensor(parts["up"][1], where, up_key, 2)
    rank = down.shape[0]
    if rank == 0 or up.shape[1] != rank:
        raise ConceptError(
            f"{where}: LoRA ranks do not match: {down_key!r} is {list(down.shape)}, {up_key!r} is {list(up.shape)}")
    scale = 1.0
    if "alpha" in parts:
        alpha_key = parts["alpha"][0]
        alpha = _float_tensor(parts["alpha"][1], where, alpha_key, (0, 1))
        if alpha.numel() != 1:
            raise ConceptError(f"{where}: {alpha_key!r} has {alpha.numel()} values, expected 1")
        scale = float(alpha.item()) if alpha_is_scale else float(alpha.item()) / rank
    return LoraFactor(down=down, up=up, scale=scale)


# ------------------------------------------------------------------------------------- file access
def _existing_file(path: Path, what: str = "concept file") -> None:
    if not path.exists():
        raise ConceptError(f"{path}: {what} not found")
    if path.is_dir():
        raise ConceptError(f"{path}: is a directory, expected a {what}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ConceptError(f"{path}: cannot read {what}: {_one_line(exc)}") from None
    if size == 0:
        raise ConceptError(f"{path}: {what} is empty (0 bytes)")


def _sniff(path: Path) -> str:
    """"torch" or "safetensors" from the first bytes, never from the extension (files get renamed)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as exc:
        raise ConceptError(f"{path}: cannot read: {_one_line(exc)}") from None
    # safetensors first: its little-endian header length may well start with 0x80; byte 8 of a
    # torch zip (compression method) or legacy pickle (magic number) is never "{".
    if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip format / legacy pickle
        return "torch"
    raise ConceptError(f"{path}: not a PyTorch (.pth/.pt) or .safetensors file (unrecognised content)")


def _pickle_imports(path: Path) -> list[str]:
    """`module.name` of the imports a pickle makes, for naming what a refused file wanted to run.

    pickletools only parses opcodes and never executes them. STACK_GLOBAL takes its names from the
    stack, approximated by the last two strings pushed, which is how pickle writes them.
    """
    found: list[str] = []
    try:
        with open(path, "rb") as raw:
            if zipfile.is_zipfile(raw):
                raw.seek(0)
                with zipfile.ZipFile(raw) as archive:
                    member = next((i for i in archive.infolist() if i.filename.endswith("data.pkl")), None)
                    ok = member is not None and member.file_size <= _SCAN_LIMIT
                    streams = [archive.read(member)] if ok else []
            else:
                raw.seek(0)
                streams = [raw.read(_SCAN_LIMIT)]  # a legacy file: several pickles, then raw storages
        for data in streams:
            stream = io.BytesIO(data)
            for _ in range(5):
                strings: list[str] = []
                for op, arg, _pos in pickletools.genops(stream):
                    if op.name == "GLOBAL" and isinstance(arg, str):
                        found.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
    except Exception:  # a damaged pickle ends the scan; what was seen so far still counts
        pass
    return found


def torch_load_weights(path: Path) -> Any:
    """A pickle restricted to tensors and plain containers (`weights_only=True`, always explicit:
    torch 2.1, which the WebUI installs, defaults to False); anything needing code is refused.

    It calls `torch.serialization.load`, never `torch.load`: inside the WebUI `torch.load` is the
    host's pickle guard (modules/safe.py), which scans the file through the same file object and
    leaves it mid-file, refuses zips written by recent torch, and returns None instead of raising.
    `weights_only=True` is the same protection without those faults."""
    try:
        # A file object, not the path: recent torch picks a loader from a ".safetensors" name.
        with warnings.catch_warnings(), open(path, "rb") as fh:
            warnings.simplefilter("ignore")
            return torch.serialization.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's restricted unpickler reports both a forbidden import and a damaged pickle as
        # "Weights only load failed"; only the former means the file asked to run code.
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        foreign = [g for g in _pickle_imports(path) if g.split(".")[0] not in ("torch", "collections")]
        reasons = [f"it imports {foreign[0]}"] if foreign else [
            ln for ln in lines if any(m in ln for m in _CODE_MARKERS)]
        if reasons:
            raise ConceptError(
                f"{path}: refused to unpickle: the file references code ({reasons[0][:160]}); only tensors "
                "and plain containers are accepted, so it was not loaded and nothing in it was run"
            ) from None
        detail = next((ln for ln in lines[1:] if "Unsupported" in ln or "Can only" in ln), lines[-1] if lines else "")
        raise ConceptError(f"{path}: corrupted or truncated PyTorch file: {_squash(detail)}") from None
    except BaseException as exc:  # torch's zip/pickle readers raise many types on damaged files
        if _is_interrupt(exc):
            raise
        raise ConceptError(f"{path}: corrupted or truncated PyTorch file: {_one_line(exc)}") from None


def _safetensors_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata; header garbage and truncation become ConceptError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except BaseException as exc:  # SafetensorError, and pyo3 panics are BaseException
        if _is_interrupt(exc):
            raise
        raise ConceptError(f"{path}: corrupted or truncated .safetensors file: {_one_line(exc)}") from None
    return tensors, metadata


def family_of_file(path: str | os.PathLike[str]) -> ModelFamily:
    """The model family a concept or LoRA file is for, from what it says (our metadata, kohya's
    `ss_base_model_version`) or else from its keys (`lora_te2_*`, transformer blocks beyond the
    first, `label_emb`: SDXL); pickles (the authors' SD1 files) are SD1. Only names and metadata
    are read. An SD2 file or an unreadable one is a ConceptError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    _existing_file(path)
    if _sniff(path) == "torch":
        return SD1
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            keys = list(handle.keys())
    except BaseException as exc:
        if _is_interrupt(exc):
            raise
        raise ConceptError(f"{path}: corrupted or truncated .safetensors file: {_one_line(exc)}") from None
    said = None
    if METADATA_KEY in metadata:
        try:
            said = json.loads(metadata[METADATA_KEY]).get("family", SD1.name)
        except (ValueError, AttributeError):
            said = None
    said = said or family_of_lora_metadata(metadata)
    if said is None and any(k.startswith("lora_te2_") or re.search(r"transformer_blocks_[1-9]|label_emb", k)
                            for k in keys):
        said = "sdxl"
    if said == "sd2":
        raise ConceptError(f"{path}: this LoRA is for SD2.x, which is not supported (SD1.x and SDXL are)")
    try:
        return family_named(said or SD1.name)
    except ValueError:
        raise ConceptError(f"{path}: says it is for model family {said!r}, which is unknown") from None


# ---------------------------------------------------------------------------------- authors' .pth
def _pth_lora(section: Any, where: str, kind: str) -> dict[str, LoraFactor]:
    """The authors' `text_encoder` / `unet` dict -> {host module name: LoraFactor}."""
    if not isinstance(section, Mapping):
        raise ConceptError(f"{where}: '{kind}' is a {type(section).__name__}, not a dict of tensors")
    targets = _linear_targets("unet" if kind == "unet" else "text")
    grouped: dict[str, dict[str, tuple[str, Any]]] = {}
    for key, value in section.items():
        if not isinstance(key, str):
            raise ConceptError(f"{where}: '{kind}' has a non-string key {key!r}")
        match = next(((key[: -len(s)], part) for s, part in _PTH_SUFFIXES if key.endswith(s)), None)
        if match is None:
            raise ConceptError(
                f"{where}: '{kind}' key {key!r} is not a LoRA weight (expected '<module>.lora_down.weight' "
                f"or '<module>_lora.down.weight'; a fused or full-weight model is not an ED-LoRA)")
        module, part = match
        name = module
        if kind == "unet":
            try:
                name = unet_diffusers_to_ldm(module)
            except KeyError:
                name = ""
        if name not in targets:
            raise ConceptError(
                f"{where}: '{kind}' key {key!r} targets {module!r}, which is not a linear layer of an SD1 "
                f"{'UNet' if kind == 'unet' else 'text encoder'}")
        parts = grouped.setdefault(name, {})
        if part in parts:
            raise ConceptError(f"{where}: '{kind}' key {key!r} duplicates {parts[part][0]!r}")
        parts[part] = (key, value)
    return {name: _factor(parts, where, alpha_is_scale=True) for name, parts in grouped.items()}


def _read_pth_params(obj: Mapping[str, Any], where: str, layers: int,
                     ) -> tuple[tuple[str, ...], torch.Tensor, dict[str, LoraFactor], dict[str, LoraFactor]]:
    """The authors' {'params': {...}} (or the bare params dict their loaders also accept)."""
    params = obj.get("params", obj)
    if not isinstance(params, Mapping):
        raise ConceptError(f"{where}: 'params' is a {type(params).__name__}, not a dict")
    unknown = [k for k in params if k not in _PTH_SECTIONS]
    if unknown:
        raise ConceptError(f"{where}: unexpected entry {unknown[0]!r} in 'params' (expected {list(_PTH_SECTIONS)})")
    if "new_concept_embedding" not in params:
        raise ConceptError(f"{where}: missing 'new_concept_embedding' (not an ED-LoRA file)")
    emb = params["new_concept_embedding"]
    if not isinstance(emb, Mapping) or not emb:
        raise ConceptError(f"{where}: 'new_concept_embedding' must be a non-empty dict of token -> [layers, D] tensor")
    tokens = tuple(_check_token(t, where) for t in emb)
    rows = [_float_tensor(emb[t], where, f"new_concept_embedding.{t}", 2) for t in tokens]
    embeddings = _check_embeddings(tokens, rows, layers, where)
    text = _pth_lora(params.get("text_encoder", {}), where, "text_encoder")
    unet = _pth_lora(params.get("unet", {}), where, "unet")
    return tokens, embeddings, unet, text


# ------------------------------------------------------------------------------------------ kohya
# PEFT's names of LoRA factors (the host renames them), and the kinds the host applies that a
# concept does not take (they change norms or need the functional path), by one of their parts.
_PEFT_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_OTHER_KINDS = {"w_norm": "Norm", "b_norm": "Norm", "on_input": "IA3", "oft_blocks": "OFT", "oft_diag": "OFT",
                "a1.weight": "GLoRA", "a2.weight": "GLoRA"}


def _module_delta(parts: dict[str, tuple[str, Any]], where: str, stem: str, is_conv: bool,
                  ) -> LoraFactor | ModuleDelta:
    """One layer's parts -> a change, checked as far as the file allows (the layer's real shape is
    checked against the model later). Plain linear LoRAs become float32 `LoraFactor`s (the host
    holds LoRA factors in its compute dtype); everything else keeps the file's tensors and dtype."""
    for peft, ours in _PEFT_PARTS.items():
        if peft in parts and {"lora_up.weight", "lora_down.weight"}.isdisjoint(parts):
            parts = {(ours if k == peft else k): v for k, v in parts.items()}
    kind = delta_kind(parts)
    if kind is None:
        other = next((_OTHER_KINDS[p] for p in parts if p in _OTHER_KINDS), None)
        key = next(iter(parts.values()))[0]
        pair = [p for p in ("lora_down.weight", "lora_up.weight") if p in parts]
        if len(pair) == 1:
            missing = "up" if pair[0] == "lora_down.weight" else "down"
            raise ConceptError(f"{where}: LoRA key {parts[pair[0]][0]!r}: its {missing} weight is missing (a LoRA "
                               "needs both)")
        if other:
            raise ConceptError(f"{where}: key {key!r} is a LyCORIS {other} layer, which a concept cannot hold "
                               "(LoRA, LoCon, LoHa, LoKr, full diffs and DoRA can be)")
        raise ConceptError(f"{where}: key {key!r}: the parts of its layer ({', '.join(sorted(parts))}) are no "
                           "LoRA kind the host knows (LoRA lora_up/lora_down, LoHa hada_*, LoKr lokr_*, full diff)")
    allowed = KIND_PARTS[kind] | SHARED_PARTS
    for part, (key, _) in parts.items():
        if part not in allowed:
            raise ConceptError(f"{where}: key {key!r} does not belong to a {kind} layer (unexpected part {part!r})")
    tensors = {}
    for part, (key, value) in parts.items():
        ndim = (0, 1) if part in ("alpha", "scale") else (1, 2, 3, 4)
        tensor = _float_tensor(value, where, key, ndim)
        if part in ("alpha", "scale") and tensor.numel() != 1:
            raise ConceptError(f"{where}: {key!r} has {tensor.numel()} values, expected 1")
        if part not in ("alpha", "scale"):
            tensor = value.detach().to("cpu", copy=True).contiguous()  # the file's dtype: host arithmetic
        tensors[part] = tensor
    if kind == "lora" and not is_conv and set(tensors) <= {"lora_up.weight", "lora_down.weight", "alpha"}:
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        return _factor({"down": (parts["lora_down.weight"][0], down.reshape(down.shape[0], -1)),
                        "up": (parts["lora_up.weight"][0], up.reshape(up.shape[0], -1)),
                        **({"alpha": parts["alpha"]} if "alpha" in parts else {})}, where, alpha_is_scale=False)
    try:
        return ModuleDelta.of(kind, tensors)
    except (RuntimeError, ValueError, IndexError) as exc:
        key = next(iter(parts.values()))[0]
        raise ConceptError(f"{where}: the {kind} factors of {stem!r} (key {key!r}) do not multiply out to a "
                           f"layer of this kind: {_one_line(exc)}") from None


def _kohya_lora(tensors: Mapping[str, Any], where: str, extra_ok: str | None = None, family: ModelFamily = SD1,
                ) -> tuple[dict[str, LoraFactor | ModuleDelta], dict[str, LoraFactor | ModuleDelta]]:
    """LoRA-file keys -> (unet changes, text changes) by module name in a `family` model; keys under
    `extra_ok` are left to the caller. Every key must reach a layer: the host skips (and debug-logs)
    keys it cannot match, but a concept missing some of its layers looks plausible and is wrong."""
    grouped: dict[str, dict[str, tuple[str, Any]]] = {}
    for key in tensors:
        if not isinstance(key, str):
            raise ConceptError(f"{where}: non-string key {key!r}")
    # name the key of the other family's text encoders first: the clearest sign of a wrong file
    if family is SD1 and (key := next((k for k in tensors if k.startswith("lora_te2_")), None)):
        raise ConceptError(f"{where}: key {key!r} belongs to an SDXL LoRA (two text encoders); this is an SD1 model")
    if family is not SD1 and (key := next((k for k in tensors if k.startswith("lora_te_")), None)):
        raise ConceptError(f"{where}: key {key!r} belongs to an SD1 LoRA (one text encoder, 'lora_te_'); "
                           f"this is an {family.label} model")
    prefixes = ("lora_unet_", "lora_te1_", *(e.lora_prefix for e in family.text_encoders))
    for key, value in tensors.items():
        if extra_ok is not None and key.startswith(extra_ok):
            continue
        stem, _, part = key.partition(".")  # the host splits at the first dot too
        if stem == "bundle_emb":
            raise ConceptError(f"{where}: key {key!r} is an embedding bundled in the LoRA; pass it as a "
                               "textual-inversion file instead (embedding= / --embedding)")
        if not stem.startswith(prefixes):
            raise ConceptError(f"{where}: key {key!r} is not a LoRA key ({' / '.join(p + '*' for p in prefixes)})")
        if not part:
            raise ConceptError(f"{where}: key {key!r} has no part after the layer name (e.g. .lora_down.weight)")
        parts = grouped.setdefault(stem, {})
        if part in parts:
            raise ConceptError(f"{where}: key {key!r} duplicates {parts[part][0]!r} (same layer)")
        parts[part] = (key, value)
    unet: dict[str, LoraFactor | ModuleDelta] = {}
    text: dict[str, LoraFactor | ModuleDelta] = {}
    seen: dict[tuple[str, str], str] = {}
    for stem, parts in grouped.items():
        target = _resolve_stem(stem, family)
        key = next(iter(parts.values()))[0]
        other = next((p for p in parts if p in _OTHER_KINDS), None)
        if other is not None:
            raise ConceptError(f"{where}: key {parts[other][0]!r} is a LyCORIS {_OTHER_KINDS[other]} layer, which a "
                               "concept cannot hold (LoRA, LoCon, LoHa, LoKr, full diffs and DoRA can be)")
        if target is None:
            hint = ""
            if family is SD1 and re.search(r"transformer_blocks_[1-9]|label_emb", stem):
                hint = " (an SDXL LoRA? its UNet has layers SD1 lacks)"
            elif family is not SD1 and re.search(r"input_blocks_[12]_1_|down_blocks_0_attentions|output_blocks_(9|1[01])_",
                                                 stem):
                hint = f" (an SD1 LoRA? its UNet has attention where {family.label} has none)"
            raise ConceptError(f"{where}: key {key!r} matches no layer of an {family.label} model{hint}; "
                               "the host would skip it")
        kind, name, is_conv = target
        if (kind, name) in seen:
            raise ConceptError(f"{where}: key {key!r} changes {name!r} again (also {seen[(kind, name)]!r}, "
                               "another spelling of the same layer)")
        seen[(kind, name)] = key
        (unet if kind == "unet" else text)[name] = _module_delta(parts, where, stem, is_conv)
    _check_fused_attention(text, where, family)
    return unet, text


def _check_fused_attention(text: Mapping[str, Any], where: str, family: ModelFamily) -> None:
    """The host holds SDXL's te2 attention as one MultiheadAttention and applies a LoRA's q, k, v and
    out changes of a layer only when all four are there; a file with some of them would silently
    lose them in the host, so it is refused."""
    if family is SD1:
        return
    layers: dict[str, set[str]] = {}
    for name in text:
        if m := re.fullmatch(r"(1\.text_model\.encoder\.layers\.\d+)\.self_attn\.(q|k|v|out)_proj", name):
            layers.setdefault(m[1], set()).add(m[2])
    for layer, have in layers.items():
        if have != {"q", "k", "v", "out"}:
            missing = ", ".join(sorted({"q", "k", "v", "out"} - have))
            raise ConceptError(f"{where}: te2 layer {layer[2:]!r} has attention changes without {missing}: the host "
                               "applies a te2 attention LoRA only with all of q, k, v and out (it would drop these)")


def _ti_vectors(obj: Any, where: str) -> torch.Tensor:
    """[n, D] vectors of an A1111 textual-inversion embedding (the layouts the host accepts for SD1)."""
    if not isinstance(obj, Mapping) or not obj:
        raise ConceptError(f"{where}: not a textual-inversion embedding (expected a dict)")
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise ConceptError(f"{where}: 'string_to_param' must hold exactly one embedding")
        key, value = next(iter(params.items()))
        key = f"string_to_param.{key}"
    elif "clip_l" in obj or "clip_g" in obj:
        raise ConceptError(f"{where}: this is an SDXL embedding (clip_l/clip_g); only SD1 is supported")
    elif "emb_params" in obj:
        key, value = "emb_params", obj["emb_params"]
    else:
        tensor_items = [(k, v) for k, v in obj.items() if isinstance(v, torch.Tensor)]
        if len(obj) != 1 or len(tensor_items) != 1:
            raise ConceptError(
                f"{where}: not a textual-inversion embedding (expected 'string_to_param', 'emb_params' "
                f"or a single tensor; found keys {[str(k) for k in list(obj)[:4]]})")
        key, value = tensor_items[0]
    vectors = _float_tensor(value, where, str(key), (1, 2))
    vectors = vectors.unsqueeze(0) if vectors.dim() == 1 else vectors
    if vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise ConceptError(f"{where}: embedding {key!r} is empty ({list(vectors.shape)})")
    return vectors


def _read_embedding_file(path: Path) -> torch.Tensor:
    _existing_file(path, "embedding file")
    if _sniff(path) == "torch":
        return _ti_vectors(torch_load_weights(path), str(path))
    tensors, _ = _safetensors_load(path)
    return _ti_vectors(tensors, str(path))


def _ti_tokens(base: str, n: int, where: str) -> tuple[str, ...]:
    base = base[1:-1] if len(base) > 2 and base.startswith("<") and base.endswith(">") else base
    tokens = (f"<{base}>",) if n == 1 else tuple(f"<{base}{i + 1}>" for i in range(n))
    return tuple(_check_token(t, where) for t in tokens)


# -------------------------------------------------------------------------------------- our format
def _read_ours(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], where: str, layers: int,
               family: ModelFamily) -> tuple[dict[str, Any], tuple[str, ...], torch.Tensor, dict[str, LoraFactor],
                          dict[str, LoraFactor]]:
    try:
        info = json.loads(metadata[METADATA_KEY])
    except (ValueError, RecursionError) as exc:
        raise ConceptError(f"{where}: metadata {METADATA_KEY!r} is not valid JSON: {_one_line(exc)}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ConceptError(f"{where}: metadata {METADATA_KEY!r} is not a {FORMAT!r} description")
    if info.get("version") not in READABLE_VERSIONS:
        raise ConceptError(
            f"{where}: {FORMAT} version {info.get('version')!r} is not supported (this reader knows {VERSION})")
    raw_tokens = info.get("tokens")
    if not isinstance(raw_tokens, list):
        raise ConceptError(f"{where}: metadata 'tokens' must be a list of strings")
    tokens = tuple(_check_token(t, where) for t in raw_tokens)
    triggers = info.get("triggers", [])
    if not isinstance(triggers, list) or not all(isinstance(t, str) and t.strip() for t in triggers):
        raise ConceptError(f"{where}: metadata 'triggers' must be a list of non-empty strings")
    if not tokens and not triggers:
        raise ConceptError(f"{where}: the concept has neither tokens nor trigger words")
    for field in ("name", "class_word", "base_model_hash", "source_sha256"):
        value = info.get(field)
        if value is not None and not isinstance(value, str):
            raise ConceptError(f"{where}: metadata {field!r} must be a string or null")
    if not isinstance(info.get("name"), str):
        raise ConceptError(f"{where}: metadata 'name' must be a string")
    written_for = info.get("family", SD1.name)
    if written_for != family.name:
        raise ConceptError(f"{where}: this concept is for {FAMILY_LABELS.get(written_for, repr(written_for))}; "
                           f"this is an {family.label} model")
    if info.get("layers") != layers:
        raise ConceptError(f"{where}: metadata 'layers' is {info.get('layers')!r}, expected {layers}")
    emb_keys = sorted(k for k in tensors if k.startswith(EMBEDDING_PREFIX))
    want = [f"{EMBEDDING_PREFIX}{i}" for i in range(len(tokens))]
    if sorted(want) != emb_keys:
        extra = sorted(set(emb_keys) - set(want))
        missing = sorted(set(want) - set(emb_keys))
        bad = (extra or missing)[0] if (extra or missing) else EMBEDDING_PREFIX
        raise ConceptError(
            f"{where}: embedding key {bad!r} {'is unexpected' if extra else 'is missing'} "
            f"({len(tokens)} tokens in the metadata)")
    rows = [_float_tensor(tensors[k], where, k, 2) for k in want]
    embeddings = _check_embeddings(tokens, rows, layers, where) if tokens else torch.zeros(0, layers, 0)
    if tokens and info.get("dim") != embeddings.shape[2]:
        raise ConceptError(f"{where}: metadata 'dim' is {info.get('dim')!r}, the embeddings are {embeddings.shape[2]} wide")
    unet, text = _kohya_lora(tensors, where, extra_ok=EMBEDDING_PREFIX, family=family)
    return info, tokens, embeddings, unet, text


# ---------------------------------------------------------------------------------------- public
def read_concept(path: str | os.PathLike[str], *, embedding: str | os.PathLike[str] | None = None,
                 name: str | None = None, layers: int | None = None, trigger: str | None = None,
                 family: ModelFamily = SD1) -> Concept:
    """Load a concept from the authors' ED-LoRA `.pth`, our `.safetensors`, or any LoRA file the
    host applies (kohya, LyCORIS) plus an A1111 textual-inversion `embedding=`, or alone as a
    trigger-word concept; the kind is recognised from the content.

    `trigger` gives the trigger words ("ohwx man", commas separate several); without it they come
    from the host's sidecar `<file>.json` ("activation text"), else from the file's tag
    frequencies (`Concept.trigger_source` says which). `trigger=""` reads a LoRA for its weights
    alone (applied inside a region): words are looked up as above but may be missing.

    `name` overrides the concept name (default: the file stem, or the name stored in our format;
    for kohya + embedding it is the base of the token names, default the embedding's stem).
    `family` is the model family the concept is for: its layer names must be that family's, and a
    file that says it is for another family is refused. `layers` is the number of embedding rows
    per token the target model needs (default: the family's cross-attention layers).
    Raises ConceptError naming the file and key for anything unusable.
    """
    layers = family.layers if layers is None else layers
    path = Path(path)
    where = str(path)
    _existing_file(path)
    kind = _sniff(path)
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ConceptError(f"{where}: the concept name must be a non-empty string")
    if kind == "torch":
        obj = torch_load_weights(path)
        if isinstance(obj, Mapping) and ("params" in obj or "new_concept_embedding" in obj):
            if embedding is not None or trigger:
                raise ConceptError(f"{where}: is an ED-LoRA file with its own embeddings; embedding= and trigger= "
                                   "are only for LoRAs without them")
            if family is not SD1:
                raise ConceptError(f"{where}: the authors' ED-LoRA files are for SD1.x; this is an {family.label} model")
            tokens, embeddings, unet, text = _read_pth_params(obj, where, layers)
            return Concept(name=name or path.stem, tokens=tokens, embeddings=embeddings, unet_lora=unet,
                           text_lora=text, source_path=where, source_sha256=sha256_file(path))
        if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and k.startswith("lora_") for k in obj):
            return _read_kohya_pair(path, obj, {}, embedding, name, layers, trigger, family)
        found = list(obj)[:4] if isinstance(obj, Mapping) else type(obj).__name__
        raise ConceptError(
            f"{where}: not an ED-LoRA file: expected {{'params': {{'new_concept_embedding', 'text_encoder', "
            f"'unet'}}}}, found {found}")
    tensors, metadata = _safetensors_load(path)
    if METADATA_KEY in metadata:
        if embedding is not None:
            raise ConceptError(f"{where}: is a Mix-of-Show concept with its own embeddings; embedding= is only for kohya LoRAs")
        info, tokens, embeddings, unet, text = _read_ours(tensors, metadata, where, layers, family)
        if tokens and trigger:
            raise ConceptError(f"{where}: is a Mix-of-Show concept with tokens; trigger words are for LoRAs without them")
        triggers = tuple(info.get("triggers", ()))
        if trigger:
            triggers = _parse_triggers(trigger, where)
        return Concept(name=name or info["name"], tokens=tokens, embeddings=embeddings, unet_lora=unet,
                       text_lora=text, class_word=info.get("class_word"), triggers=() if tokens else triggers,
                       trigger_source=None if tokens else ("given" if trigger else "the file"),
                       base_model_hash=info.get("base_model_hash"), source_path=where,
                       source_sha256=info.get("source_sha256"), family=family)
    if any(k.startswith(EMBEDDING_PREFIX) for k in tensors):
        raise ConceptError(f"{where}: has {EMBEDDING_PREFIX}* keys but no {METADATA_KEY!r} metadata (damaged file?)")
    return _read_kohya_pair(path, tensors, metadata, embedding, name, layers, trigger, family)


def _parse_triggers(text: str, where: str) -> tuple[str, ...]:
    """"ohwx man, red coat" -> ("ohwx man", "red coat")."""
    if not isinstance(text, str):
        raise ConceptError(f"{where}: trigger words must be a string, got {type(text).__name__}")
    words = tuple(" ".join(w.split()) for w in text.split(",") if w.strip())
    if not words:
        raise ConceptError(f"{where}: the trigger words are empty")
    return words


def _most_frequent_tag(metadata: Mapping[str, str], where: str) -> tuple[str, int] | None:
    """The most frequent tag of kohya's `ss_tag_frequency` ({dataset folder: {tag: count}}), summed
    over folders; ties go to the alphabetically first tag. None when there is none."""
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return None
    try:
        folders = json.loads(raw)
    except (ValueError, RecursionError):
        raise ConceptError(f"{where}: metadata 'ss_tag_frequency' is not valid JSON") from None
    counts: dict[str, int] = {}
    for tags in (folders.values() if isinstance(folders, dict) else ()):
        for tag, count in (tags.items() if isinstance(tags, dict) else ()):
            tag = " ".join(str(tag).split())
            if tag and isinstance(count, (int, float)):
                counts[tag] = counts.get(tag, 0) + int(count)
    if not counts:
        return None
    tag = min(counts, key=lambda t: (-counts[t], t))
    return tag, counts[tag]


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The host's per-LoRA user metadata file (`models/Lora/<name>.json`, next to the LoRA)."""
    return Path(path).with_suffix(".json")


def _sidecar_triggers(path: Path) -> str | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ConceptError(f"{side}: the LoRA's sidecar json cannot be read: {_one_line(exc)}") from None
    text = data.get("activation text") if isinstance(data, dict) else None
    return text if isinstance(text, str) and text.strip() else None


def find_triggers(path: Path, metadata: Mapping[str, str], trigger: str | None) -> tuple[tuple[str, ...], str]:
    """A LoRA's trigger words and where they came from."""
    where = str(path)
    if trigger is not None:
        return _parse_triggers(trigger, where), "given"
    side = _sidecar_triggers(path)
    if side is not None:
        return _parse_triggers(side, str(sidecar_path(path))), f"activation text of {sidecar_path(path).name}"
    tag = _most_frequent_tag(metadata, where)
    if tag is not None:
        return (tag[0],), f"most frequent training tag ({tag[1]} times in ss_tag_frequency)"
    raise ConceptError(
        f"{where}: a LoRA without concept tokens or trigger words; give its trigger words "
        "(trigger= / --trigger, the host's activation text in its .json) or its textual-inversion "
        "embedding (embedding= / --embedding)")


def _read_kohya_pair(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str],
                     embedding: str | os.PathLike[str] | None, name: str | None, layers: int,
                     trigger: str | None, family: ModelFamily) -> Concept:
    where = str(path)
    if not tensors:
        raise ConceptError(f"{where}: has no LoRA weights")
    meant = family_of_lora_metadata(metadata)
    if meant is not None and meant != family.name:
        raise ConceptError(f"{where}: metadata 'ss_base_model_version'/'ss_v2' says this LoRA is for "
                           f"{FAMILY_LABELS.get(meant, meant)}; this is an {family.label} model")
    unet, text = _kohya_lora(tensors, where, family=family)
    if embedding is None:
        if trigger == "":  # read for its weights only (a region LoRA): trigger words are optional
            try:
                triggers, source = find_triggers(path, metadata, None)
            except ConceptError:
                triggers, source = (), None
        else:
            triggers, source = find_triggers(path, metadata, trigger)
        return Concept(name=name or path.stem, tokens=(), embeddings=torch.zeros(0, layers, 0), unet_lora=unet,
                       text_lora=text, triggers=triggers, trigger_source=source, source_path=where,
                       source_sha256=sha256_file(path), family=family)
    if trigger is not None:
        raise ConceptError(f"{where}: give either an embedding or trigger words, not both")
    emb_path = Path(embedding)
    vectors = _read_embedding_file(emb_path)
    base = name or emb_path.stem
    tokens = _ti_tokens(base, vectors.shape[0], str(emb_path))
    rows = [v.unsqueeze(0).expand(layers, -1).clone() for v in vectors]
    embeddings = _check_embeddings(tokens, rows, layers, str(emb_path))
    concept_name = base[1:-1] if len(base) > 2 and base.startswith("<") and base.endswith(">") else base
    return Concept(name=concept_name, tokens=tokens, embeddings=embeddings, unet_lora=unet, text_lora=text,
                   source_path=where, source_sha256=sha256_file(path), family=family)


def _validate_for_writing(concept: Concept, where: str) -> None:
    """What the readers guarantee, checked again because a Concept may be built in code."""
    tokens = tuple(_check_token(t, where) for t in concept.tokens)
    emb = concept.embeddings
    if not tokens:
        if not concept.triggers or not all(isinstance(t, str) and t.strip() for t in concept.triggers):
            raise ConceptError(f"{where}: a concept needs tokens or trigger words")
    elif not isinstance(emb, torch.Tensor) or emb.dim() != 3 or emb.shape[0] != len(tokens):
        shape = list(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise ConceptError(f"{where}: embeddings must be [n_tokens={len(tokens)}, layers, dim], got {shape}")
    else:
        _check_embeddings(tokens, [_float_tensor(emb[i], where, f"embedding of {t!r}", 2) for i, t in enumerate(tokens)],
                          emb.shape[1], where)
    known = {(kind, name): conv for kind, name, conv in _layer_table(concept.family).values()}
    for kind, lora in (("unet", concept.unet_lora), ("text", concept.text_lora)):
        for module, f in lora.items():
            if (kind, module) not in known:
                raise ConceptError(f"{where}: {kind} change of {module!r}, which is not a layer of an "
                                   f"{concept.family.label} model")
            if isinstance(f, LoraFactor):
                _factor({"down": (f"{module} (down)", f.down), "up": (f"{module} (up)", f.up)}, where,
                        alpha_is_scale=True)
                if not math.isfinite(f.scale):
                    raise ConceptError(f"{where}: {kind} LoRA {module!r} has a non-finite scale {f.scale}")
            else:  # the reader's checks of a layer's parts, so that what is written reads back
                _module_delta({part: (f"{module}.{part}", t) for part, t in f.parts.items()}, where, module,
                              known[(kind, module)])


def layer_tensors(stem: str, f: LoraFactor | ModuleDelta) -> dict[str, torch.Tensor]:
    """A layer's keys in the file: a LoRA factor as lora_down/lora_up/alpha (alpha = scale * rank),
    any other change with the parts it was read with, unchanged, so the host applies the same."""
    if isinstance(f, ModuleDelta):
        return {f"{stem}.{part}": t.detach().cpu().clone() for part, t in f.parts.items()}
    return {f"{stem}.lora_down.weight": f.down.detach().cpu().clone(),
            f"{stem}.lora_up.weight": f.up.detach().cpu().clone(),
            f"{stem}.alpha": torch.tensor(f.scale * f.rank, dtype=torch.float32)}


def write_concept(concept: Concept, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write our format: a LoRA `.safetensors` the host's Lora applies (every layer kind as read)
    that also carries the layer-wise embeddings (`mos_concept.embedding.<i>`) and a JSON
    description (`mos_concept`: tokens or trigger words, ...).

    The file appears complete or not at all; an existing file is kept unless `overwrite`.
    """
    path = Path(path)
    where = str(path)
    if path.suffix.lower() != ".safetensors":
        raise ConceptError(f"{where}: a concept is written as .safetensors (the host's Lora folder format)")
    _validate_for_writing(concept, where)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(len(concept.tokens)):
        tensors[f"{EMBEDDING_PREFIX}{i}"] = concept.embeddings[i].detach().cpu().clone()
    alphas = set()
    for kind, lora in (("unet", concept.unet_lora), ("text", concept.text_lora)):
        for module, f in lora.items():
            layer = layer_tensors(_kohya_name(kind, module, concept.family), f)
            alphas.update(float(t) for k, t in layer.items() if k.endswith(".alpha"))
            tensors.update(layer)
    rank = concept.rank
    info = {
        "format": FORMAT,
        "version": VERSION,
        "name": concept.name,
        "tokens": list(concept.tokens),
        "triggers": list(concept.triggers),
        "layers": concept.layers,
        "dim": concept.dim if concept.tokens else None,
        "rank": rank,
        "class_word": concept.class_word,
        "base_model_hash": concept.base_model_hash,
        "source_sha256": concept.source_sha256,
        "family": concept.family.name,
    }
    kinds = {f.kind if isinstance(f, ModuleDelta) else "lora"
             for f in (*concept.unet_lora.values(), *concept.text_lora.values())}
    metadata = {
        METADATA_KEY: json.dumps(info),
        "ss_network_module": "networks.lora" if kinds <= {"lora"} else "lycoris.kohya",
        "ss_network_dim": str(rank) if rank is not None else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        # the host's Lora list shows a LoRA for the loaded model's family only (SDXL: "sdxl_" prefix)
        "ss_base_model_version": concept.family.lora_version_written,
    }
    try:
        return atomic_save_safetensors(tensors, path, metadata=metadata, overwrite=overwrite)
    except FileExistsError:
        raise ConceptError(f"{where}: already exists (pass overwrite=True / --overwrite to replace it)") from None
    except OSError as exc:
        raise ConceptError(f"{where}: cannot write: {_one_line(exc)}") from None


def check_concept_set(concepts: Iterable[Concept]) -> None:
    """Concepts used together need distinct tokens, none inside another: binding replaces plain
    substrings, so `<cat>` inside `<cat>2` or a token defined twice would bind the wrong rows."""
    owners: list[tuple[str, str]] = []  # (token, file or concept name)
    for concept in concepts:
        origin = concept.source_path or concept.name
        for token in concept.tokens:
            owners.append((token, origin))
    for i, (a, file_a) in enumerate(owners):
        for b, file_b in owners[i + 1:]:
            if a == b:
                raise ConceptError(f"token {a!r} is defined twice: by {file_a} and by {file_b}")
            if a in b or b in a:
                inner, outer = (a, b) if a in b else (b, a)
                f_in, f_out = (file_a, file_b) if a in b else (file_b, file_a)
                raise ConceptError(
                    f"token {inner!r} ({f_in}) is part of token {outer!r} ({f_out}); binding replaces text, "
                    "so one token may not contain another (rename one)")


def check_against_model(concept: Concept, model: Any) -> None:
    """The concept fits this model (SD1Model or SDXLModel): its family, one embedding row per attn2
    layer, widths and LoRA shapes."""
    what = concept.source_path or concept.name
    if concept.family is not model.family:
        raise ConceptError(f"{what}: this concept is for {concept.family.label}; this is an {model.family.label} model")
    if concept.layers != model.family.layers:
        raise ConceptError(
            f"{what}: embeddings have {concept.layers} layer rows per token, the model has "
            f"{model.family.layers} cross-attention layers")
    check_fits(concept, model.unet, model.text_root)
