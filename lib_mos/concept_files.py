"""Concept files: read the authors' ED-LoRA `.pth`, kohya LoRA + textual-inversion pairs and our own
`.safetensors` format into `lib_mos.concepts.Concept`; write our format.

Our format is one `.safetensors` file that is at the same time an ordinary kohya LoRA, so the
host's built-in Lora (`<lora:name:1>`) applies its weights when the file sits in `models/Lora`,
while the layer-wise embeddings ride along under a private key prefix the host cannot match (it
only debug-logs such keys) and the concept's description sits in the safetensors metadata.

Every reader validates the whole file and builds the complete Concept before returning it, and
every problem is a `ConceptError` whose message names the file (and the key, where there is one):
a user with a dozen concept files needs to know which one is broken and why, not a traceback.
Pickles are only ever opened with `torch_load_weights` (`weights_only=True`, past the host's guard).

Choices (see also the module constants):
- Only the 128 UNet and 48 text-encoder attention linears that ED-LoRA trains are LoRA targets.
  A file with LoRA on anything else (feed-forward, proj_in/out, convs; the authors' optional
  `where: Transformer2DModel` / `CLIPEncoderLayer` configs) is refused, naming the key, rather than
  loaded partially: a concept silently missing half its weights looks plausible and is wrong.
- All tensors are returned as independent float32 copies (fp16/bf16 files upcast losslessly).
- A textual-inversion embedding with n vectors becomes n tokens (`<base>` for one vector,
  `<base1>` ... `<baseN>` for several, mirroring the authors' `<potter1> <potter2>`), each with
  the same row on every layer; `base` is `name` or the embedding file's stem, without `<>`.
- Token names must be non-empty and free of whitespace and of the host's prompt syntax characters
  `()[]{}:|\\,`, because binding is a plain string replace inside prompts the host also parses.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lib_mos import sd1
from lib_mos.concepts import (
    Concept,
    ConceptError,
    LoraFactor,
    check_fits,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
)
from lib_mos.files import atomic_save_safetensors

__all__ = [
    "EMBEDDING_PREFIX",
    "FORMAT",
    "METADATA_KEY",
    "VERSION",
    "check_against_model",
    "check_concept_set",
    "read_concept",
    "sha256_file",
    "torch_load_weights",
    "write_concept",
]

FORMAT = "mos-concept"
VERSION = 1
METADATA_KEY = "mos_concept"
EMBEDDING_PREFIX = "mos_concept.embedding."
SD1_LAYERS = 16
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


@functools.cache
def _unet_targets() -> frozenset[str]:
    return frozenset(sd1.unet_attention_linear_names())


@functools.cache
def _text_targets() -> frozenset[str]:
    return frozenset(sd1.text_attention_linear_names())


@functools.cache
def _kohya_targets() -> dict[str, tuple[str, str]]:
    """kohya module key -> ("unet" | "text", host module name).

    Underscores are ambiguous (`to_out_0`, `transformer_blocks`), so names are matched against the
    known SD1 targets instead of being split. Besides kohya's usual diffusers spelling, accept the
    other spellings the host resolves for SD1: ldm names (`lora_unet_input_blocks_1_1_...`) and
    `lora_te1_` for the text encoder.
    """
    table: dict[str, tuple[str, str]] = {}
    for ldm in sd1.unet_attention_linear_names():
        table["lora_unet_" + unet_ldm_to_diffusers(ldm).replace(".", "_")] = ("unet", ldm)
        table["lora_unet_" + ldm.replace(".", "_")] = ("unet", ldm)
    for name in sd1.text_attention_linear_names():
        flat = name.replace(".", "_")
        table["lora_te_" + flat] = ("text", name)
        table["lora_te1_" + flat] = ("text", name)
    return table


def _kohya_name(kind: str, name: str) -> str:
    """The key stem our writer uses: kohya's own diffusers spelling, the host's primary path."""
    if kind == "unet":
        return "lora_unet_" + unet_ldm_to_diffusers(name).replace(".", "_")
    return "lora_te_" + name.replace(".", "_")


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


# ---------------------------------------------------------------------------------- authors' .pth
def _pth_lora(section: Any, where: str, kind: str) -> dict[str, LoraFactor]:
    """The authors' `text_encoder` / `unet` dict -> {host module name: LoraFactor}."""
    if not isinstance(section, Mapping):
        raise ConceptError(f"{where}: '{kind}' is a {type(section).__name__}, not a dict of tensors")
    targets = _unet_targets() if kind == "unet" else _text_targets()
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
                f"{where}: '{kind}' key {key!r} targets {module!r}, which is not one of the SD1 attention "
                f"linears ED-LoRA trains (LoRA on other layers is not supported)")
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
def _kohya_lora(tensors: Mapping[str, Any], where: str, extra_ok: str | None = None,
                ) -> tuple[dict[str, LoraFactor], dict[str, LoraFactor]]:
    """kohya keys -> (unet_lora, text_lora); keys under `extra_ok` are left to the caller."""
    table = _kohya_targets()
    grouped: dict[tuple[str, str], dict[str, tuple[str, Any]]] = {}
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise ConceptError(f"{where}: non-string key {key!r}")
        if extra_ok is not None and key.startswith(extra_ok):
            continue
        stem, _, part = key.partition(".")  # the host splits at the first dot too
        if not stem.startswith(("lora_unet_", "lora_te_", "lora_te1_")):
            raise ConceptError(f"{where}: key {key!r} is not a kohya LoRA key (lora_unet_* / lora_te_*)")
        target = table.get(stem)
        if target is None:
            raise ConceptError(
                f"{where}: LoRA key {key!r} targets a layer outside the SD1 attention linears a Mix-of-Show "
                "concept uses (q/k/v/out of the UNet attentions and text self-attention); refusing to load a "
                "partial concept, apply this LoRA with the host's <lora:...> instead")
        if part not in _KOHYA_PARTS:
            raise ConceptError(f"{where}: key {key!r} is not a plain LoRA weight (lora_down/lora_up/alpha)")
        parts = grouped.setdefault(target, {})
        if _KOHYA_PARTS[part] in parts:
            raise ConceptError(f"{where}: key {key!r} duplicates {parts[_KOHYA_PARTS[part]][0]!r} (same layer)")
        parts[_KOHYA_PARTS[part]] = (key, value)
    unet: dict[str, LoraFactor] = {}
    text: dict[str, LoraFactor] = {}
    for (kind, name), parts in grouped.items():
        factor = _factor(parts, where, alpha_is_scale=False)
        (unet if kind == "unet" else text)[name] = factor
    return unet, text


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
               ) -> tuple[dict[str, Any], tuple[str, ...], torch.Tensor, dict[str, LoraFactor],
                          dict[str, LoraFactor]]:
    try:
        info = json.loads(metadata[METADATA_KEY])
    except (ValueError, RecursionError) as exc:
        raise ConceptError(f"{where}: metadata {METADATA_KEY!r} is not valid JSON: {_one_line(exc)}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ConceptError(f"{where}: metadata {METADATA_KEY!r} is not a {FORMAT!r} description")
    if info.get("version") != VERSION:
        raise ConceptError(
            f"{where}: {FORMAT} version {info.get('version')!r} is not supported (this reader knows {VERSION})")
    raw_tokens = info.get("tokens")
    if not isinstance(raw_tokens, list):
        raise ConceptError(f"{where}: metadata 'tokens' must be a list of strings")
    tokens = tuple(_check_token(t, where) for t in raw_tokens)
    for field in ("name", "class_word", "base_model_hash", "source_sha256"):
        value = info.get(field)
        if value is not None and not isinstance(value, str):
            raise ConceptError(f"{where}: metadata {field!r} must be a string or null")
    if not isinstance(info.get("name"), str):
        raise ConceptError(f"{where}: metadata 'name' must be a string")
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
    embeddings = _check_embeddings(tokens, rows, layers, where)
    if info.get("dim") != embeddings.shape[2]:
        raise ConceptError(f"{where}: metadata 'dim' is {info.get('dim')!r}, the embeddings are {embeddings.shape[2]} wide")
    unet, text = _kohya_lora(tensors, where, extra_ok=EMBEDDING_PREFIX)
    return info, tokens, embeddings, unet, text


# ---------------------------------------------------------------------------------------- public
def read_concept(path: str | os.PathLike[str], *, embedding: str | os.PathLike[str] | None = None,
                 name: str | None = None, layers: int = SD1_LAYERS) -> Concept:
    """Load a concept from the authors' ED-LoRA `.pth`, our `.safetensors`, or a kohya LoRA plus an
    A1111 textual-inversion `embedding=`; the kind is recognised from the content.

    `name` overrides the concept name (default: the file stem, or the name stored in our format;
    for kohya + embedding it is the base of the token names, default the embedding's stem).
    `layers` is the number of embedding rows per token the target model needs (16 for SD1).
    Raises ConceptError naming the file and key for anything unusable.
    """
    path = Path(path)
    where = str(path)
    _existing_file(path)
    kind = _sniff(path)
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ConceptError(f"{where}: the concept name must be a non-empty string")
    if kind == "torch":
        obj = torch_load_weights(path)
        if isinstance(obj, Mapping) and ("params" in obj or "new_concept_embedding" in obj):
            if embedding is not None:
                raise ConceptError(f"{where}: is an ED-LoRA file with its own embeddings; embedding= is only for kohya LoRAs")
            tokens, embeddings, unet, text = _read_pth_params(obj, where, layers)
            return Concept(name=name or path.stem, tokens=tokens, embeddings=embeddings, unet_lora=unet,
                           text_lora=text, source_path=where, source_sha256=sha256_file(path))
        if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and k.startswith("lora_") for k in obj):
            return _read_kohya_pair(path, obj, embedding, name, layers)
        found = list(obj)[:4] if isinstance(obj, Mapping) else type(obj).__name__
        raise ConceptError(
            f"{where}: not an ED-LoRA file: expected {{'params': {{'new_concept_embedding', 'text_encoder', "
            f"'unet'}}}}, found {found}")
    tensors, metadata = _safetensors_load(path)
    if METADATA_KEY in metadata:
        if embedding is not None:
            raise ConceptError(f"{where}: is a Mix-of-Show concept with its own embeddings; embedding= is only for kohya LoRAs")
        info, tokens, embeddings, unet, text = _read_ours(tensors, metadata, where, layers)
        return Concept(name=name or info["name"], tokens=tokens, embeddings=embeddings, unet_lora=unet,
                       text_lora=text, class_word=info.get("class_word"),
                       base_model_hash=info.get("base_model_hash"), source_path=where,
                       source_sha256=info.get("source_sha256"))
    if any(k.startswith(EMBEDDING_PREFIX) for k in tensors):
        raise ConceptError(f"{where}: has {EMBEDDING_PREFIX}* keys but no {METADATA_KEY!r} metadata (damaged file?)")
    return _read_kohya_pair(path, tensors, embedding, name, layers)


def _read_kohya_pair(path: Path, tensors: Mapping[str, Any], embedding: str | os.PathLike[str] | None,
                     name: str | None, layers: int) -> Concept:
    where = str(path)
    if embedding is None:
        raise ConceptError(
            f"{where}: is a kohya LoRA without concept tokens; pass its textual-inversion embedding "
            "(embedding= / --embedding) to make a concept of it")
    if not tensors:
        raise ConceptError(f"{where}: has no LoRA weights")
    unet, text = _kohya_lora(tensors, where)
    emb_path = Path(embedding)
    vectors = _read_embedding_file(emb_path)
    base = name or emb_path.stem
    tokens = _ti_tokens(base, vectors.shape[0], str(emb_path))
    rows = [v.unsqueeze(0).expand(layers, -1).clone() for v in vectors]
    embeddings = _check_embeddings(tokens, rows, layers, str(emb_path))
    concept_name = base[1:-1] if len(base) > 2 and base.startswith("<") and base.endswith(">") else base
    return Concept(name=concept_name, tokens=tokens, embeddings=embeddings, unet_lora=unet, text_lora=text,
                   source_path=where, source_sha256=sha256_file(path))


def _validate_for_writing(concept: Concept, where: str) -> None:
    """What the readers guarantee, checked again because a Concept may be built in code."""
    tokens = tuple(_check_token(t, where) for t in concept.tokens)
    emb = concept.embeddings
    if not isinstance(emb, torch.Tensor) or emb.dim() != 3 or emb.shape[0] != len(tokens):
        shape = list(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise ConceptError(f"{where}: embeddings must be [n_tokens={len(tokens)}, layers, dim], got {shape}")
    _check_embeddings(tokens, [_float_tensor(emb[i], where, f"embedding of {t!r}", 2) for i, t in enumerate(tokens)],
                      emb.shape[1], where)
    for kind, lora, targets in (("unet", concept.unet_lora, _unet_targets()),
                                ("text", concept.text_lora, _text_targets())):
        for module, f in lora.items():
            if module not in targets:
                raise ConceptError(f"{where}: {kind} LoRA target {module!r} is not an SD1 attention linear")
            _factor({"down": (f"{module} (down)", f.down), "up": (f"{module} (up)", f.up)}, where,
                    alpha_is_scale=True)
            if not math.isfinite(f.scale):
                raise ConceptError(f"{where}: {kind} LoRA {module!r} has a non-finite scale {f.scale}")


def write_concept(concept: Concept, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write our format: a kohya LoRA `.safetensors` (alpha = scale * rank) that also carries the
    layer-wise embeddings (`mos_concept.embedding.<i>`) and a JSON description (`mos_concept`).

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
            stem = _kohya_name(kind, module)
            alpha = torch.tensor(f.scale * f.rank, dtype=torch.float32)
            alphas.add(float(alpha))
            tensors[f"{stem}.lora_down.weight"] = f.down.detach().cpu().clone()
            tensors[f"{stem}.lora_up.weight"] = f.up.detach().cpu().clone()
            tensors[f"{stem}.alpha"] = alpha
    rank = concept.rank
    info = {
        "format": FORMAT,
        "version": VERSION,
        "name": concept.name,
        "tokens": list(concept.tokens),
        "layers": concept.layers,
        "dim": concept.dim,
        "rank": rank,
        "class_word": concept.class_word,
        "base_model_hash": concept.base_model_hash,
        "source_sha256": concept.source_sha256,
    }
    metadata = {
        METADATA_KEY: json.dumps(info),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank) if rank is not None else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
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


def check_against_model(concept: Concept, model: sd1.SD1Model) -> None:
    """The concept fits this SD1 model: one embedding row per attn2 layer, widths and LoRA shapes."""
    what = concept.source_path or concept.name
    if concept.layers != len(sd1.ATTN2_NAMES):
        raise ConceptError(
            f"{what}: embeddings have {concept.layers} layer rows per token, the model has "
            f"{len(sd1.ATTN2_NAMES)} cross-attention layers")
    check_fits(concept, model.unet, model.text_encoder)
