"""Fused checkpoints as files: the base read from its file, the fused weights written in the
WebUI's key layout with every concept's layer-wise embeddings and the report in the metadata, and
the file-level entry point the CLI and the tab use (`fuse_checkpoint`: concept files in, one
checkpoint out, written atomically)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lib_mos.concepts.concept import Concept, ConceptError
from lib_mos.concepts.files import torch_load_weights
from lib_mos.fusion.pipeline import (
    FusionInput,
    FusionInterrupted,
    FusionResult,
    FusionSettings,
    Progress,
    fuse,
)

FUSED_METADATA_KEY = "mos_fusion"
FUSED_EMBEDDING_PREFIX = "mos_fusion.embedding."
_POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def read_base_state_dict(path) -> dict[str, torch.Tensor]:
    """Base weights from the checkpoint file (never from a live fp16 model); pickles only with
    weights_only=True."""
    from pathlib import Path

    import safetensors.torch

    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            sd = safetensors.torch.load_file(str(path), device="cpu")
        else:
            sd = torch_load_weights(path)
            sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    except ConceptError:
        raise
    except Exception as e:
        raise ConceptError(f"{path}: cannot read the base checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not any(str(k).startswith("model.diffusion_model.") for k in sd):
        raise ConceptError(f"{path}: not an SD1 checkpoint (no model.diffusion_model.* keys)")
    return sd


def fused_state_dict(base: dict[str, torch.Tensor], result: FusionResult, *,
                     dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The base checkpoint with fused weights, concept embeddings under a private prefix the host
    ignores (float32), position_ids dropped, the other floats cast to `dtype`."""
    from lib_mos.models.sd1 import TEXT_PREFIX, UNET_PREFIX

    sd = dict(base)
    sd.pop(_POSITION_IDS, None)
    tables = ((TEXT_PREFIX, result.text_weights, "weight"), (UNET_PREFIX, result.unet_weights, "weight"),
              (TEXT_PREFIX, result.text_biases, "bias"), (UNET_PREFIX, result.unet_biases, "bias"))
    for prefix, weights, attr in tables:
        for name, w in weights.items():
            key = f"{prefix}{name}.{attr}"
            if key not in sd:
                raise ConceptError(f"base checkpoint has no key {key}")
            if sd[key].shape != w.shape:
                raise ConceptError(f"base checkpoint key {key} is {tuple(sd[key].shape)}, fused weight {tuple(w.shape)}")
            sd[key] = w
    k = 0
    for concept in result.concepts:
        for token in concept.tokens:
            sd[f"{FUSED_EMBEDDING_PREFIX}{k}"] = concept.token_rows(token)
            k += 1
    # the schedule and the concept rows stay float32: the host keeps embeddings in float32, and
    # fp16 rows would bind a little differently from the concept files they came from
    keep = ("alphas_cumprod", FUSED_EMBEDDING_PREFIX)
    return {key: (v.to(dtype) if v.is_floating_point() and not key.startswith(keep) else v).contiguous()
            for key, v in sd.items()}


def fused_metadata(inputs: Sequence[FusionInput], settings: FusionSettings, result: FusionResult,
                   base_metadata: dict[str, str] | None = None) -> dict[str, str]:
    import json

    info = {
        "format": "mos-fused", "version": 1,
        "concepts": [{"name": i.concept.name, "tokens": list(i.concept.tokens), "triggers": list(i.concept.triggers),
                      "layers": i.concept.layers,
                      "class_word": i.concept.class_word, "source_sha256": i.concept.source_sha256,
                      "unet_weight": i.unet_weight, "text_weight": i.text_weight} for i in inputs],
        "settings": {**dataclasses.asdict(settings), "skip": sorted(settings.skip)},
        "report": result.report,
        "warnings": result.warnings,
        "seconds": result.seconds,
    }
    meta = dict(base_metadata or {})
    meta[FUSED_METADATA_KEY] = json.dumps(info)
    return meta


def read_fused_concepts(path) -> list[Concept]:
    """The concepts carried by a fused checkpoint (embeddings only: their LoRA is in the weights)."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get(FUSED_METADATA_KEY)
            if meta is None:
                return []
            info = json.loads(meta)
            concepts, k = [], 0
            for c in info["concepts"]:
                rows = []
                for _ in c["tokens"]:
                    rows.append(f.get_tensor(f"{FUSED_EMBEDDING_PREFIX}{k}").float())
                    k += 1
                # a trigger-word concept has no rows: its words are plain prompt text
                embeddings = torch.stack(rows) if rows else torch.zeros(0, c.get("layers", 16), 0)
                concepts.append(Concept(name=c["name"], tokens=tuple(c["tokens"]), embeddings=embeddings,
                                        class_word=c.get("class_word"), triggers=tuple(c.get("triggers", ())),
                                        source_path=str(path), source_sha256=c.get("source_sha256")))
            return concepts
    except (OSError, KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise ConceptError(f"{path}: broken fused-concept data ({type(e).__name__}: {e})") from e


def write_fused_checkpoint(state_dict: dict[str, torch.Tensor], path, metadata: dict[str, str], *,
                           overwrite: bool = False):
    """Atomic write (temporary file, then rename); an existing file is kept unless `overwrite`."""
    from lib_mos.files import atomic_save_safetensors

    return atomic_save_safetensors(state_dict, path, metadata=metadata, overwrite=overwrite)


# ------------------------------------------------------------------------------------ whole jobs
@dataclass
class ConceptSpec:
    """A concept file to fuse, optionally with new token names (renaming at fusion time lets two
    files trained with the same token names be fused), trigger words (for a LoRA without tokens;
    None: the file's own, `concept_files.read_concept`) and its merge weights. `concept` is the
    file already read (with these trigger words), for a caller that looked at it first."""

    path: str
    tokens: tuple[str, ...] | None = None
    unet_weight: float = 1.0
    text_weight: float = 1.0
    trigger: str | None = None
    concept: Concept | None = dataclasses.field(default=None, repr=False, compare=False)


def parse_concept_spec(spec: str, unet_weight: float = 1.0, text_weight: float = 1.0) -> ConceptSpec:
    """`FILE[:<new1>+<new2>][#trigger words][@UNET,TEXT]`: a concept file, optionally new names for
    its tokens, the trigger words of a LoRA without tokens ("ohwx man"; commas separate several:
    "ohwx man, red coat") and merge weights (else the given defaults). Read so that no path is
    misread:
    - `@UNET,TEXT` ends the spec only as two numbers (a path or trigger words may contain '@');
    - `#` starts the trigger words only right after the file's suffix (`.safetensors`, `.pt`,
      `.pth`, `.ckpt`, any case) or after the renaming, so `a#1.safetensors` is a path; the first
      such '#' counts, and the words may contain spaces, '#', ':' and '@';
    - the part after the last ':' of what is left is tokens only if it starts with '<', so Windows
      drive letters stay part of the path.
    `lora.safetensors#ohwx man@0.8,1` is lora.safetensors, trigger words "ohwx man", weights 0.8, 1."""
    import re

    head, sep, tail = spec.rpartition("@")
    if sep and re.fullmatch(r"\s*[-+0-9.eE]+\s*,\s*[-+0-9.eE]+\s*", tail):
        try:
            unet_weight, text_weight = (float(v) for v in tail.split(","))
        except ValueError as e:
            raise ConceptError(f"{spec}: merge weights must be two numbers, UNET,TEXT") from e
        spec = head
    trigger = None
    # a path may end before '#trigger words' at its suffix, then maybe the token renaming
    if m := re.fullmatch(r"(?is)(.*?\.(?:safetensors|pth|pt|ckpt)(?::<[^#]*)?)#(.*)", spec):
        spec, trigger = m[1], m[2].strip()
        if not trigger.strip(", "):
            raise ConceptError(f"{spec}: empty trigger words after '#'")
    path, tokens = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and tail.startswith("<"):
        path, tokens = head, tuple(t.strip() for t in tail.split("+"))
        if not all(tokens):
            raise ConceptError(f"{spec}: empty token name in the renaming")
    return ConceptSpec(path, tokens, unet_weight, text_weight, trigger)


def load_inputs(specs: Sequence[ConceptSpec]) -> list[FusionInput]:
    """Read every concept file (with its spec's trigger words; a spec's `concept` when already
    read), apply renames, and check the set (unique, non-nested tokens)."""
    from lib_mos.concepts.files import check_concept_set, read_concept, sha256_file

    inputs = []
    seen: dict[str, str] = {}
    for spec in specs:
        concept = spec.concept if spec.concept is not None else read_concept(spec.path, trigger=spec.trigger)
        identity = concept.source_sha256 or sha256_file(spec.path)  # the original training output, else the file
        if identity in seen:
            raise ConceptError(f"{spec.path}: the same concept is listed twice (also {seen[identity]})")
        seen[identity] = spec.path
        if spec.tokens is not None:
            if not concept.tokens:
                raise ConceptError(f"{spec.path}: a LoRA without tokens (trigger words {concept.prompt_words!r}) "
                                   "has no tokens to rename")
            if len(spec.tokens) != len(concept.tokens):
                raise ConceptError(f"{spec.path}: {len(spec.tokens)} new token names for {len(concept.tokens)} tokens "
                                   f"({' '.join(concept.tokens)})")
            concept = dataclasses.replace(concept, tokens=spec.tokens)
        inputs.append(FusionInput(concept, spec.unet_weight, spec.text_weight))
    check_concept_set([i.concept for i in inputs])
    return inputs


def fuse_checkpoint(base_path, specs: Sequence[ConceptSpec], out_path, settings: FusionSettings | None = None, *,
                    dtype: torch.dtype = torch.float16, overwrite: bool = False, device: str = "cpu",
                    progress: Progress | None = None,
                    should_stop: Callable[[], bool] | None = None) -> tuple[object, FusionResult]:
    """Base checkpoint file + concept files -> a new fused checkpoint file. Everything that can be
    checked is checked before the work starts; the file appears only when complete."""
    from pathlib import Path

    from safetensors import safe_open

    from lib_mos.models import sd1

    settings = settings or FusionSettings()
    out_path, base_path = Path(out_path), Path(base_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path}: already exists (choose another name or allow overwriting)")
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"{out_path.parent}: no such folder")
    if base_path.suffix.lower() != ".safetensors":
        raise ConceptError(f"{base_path}: the base checkpoint must be a .safetensors file")
    inputs = load_inputs(specs)
    try:
        model = sd1.load_checkpoint(base_path, device=device)
    except (ValueError, FileNotFoundError) as e:
        raise ConceptError(str(e)) from e
    result = fuse(model, inputs, settings, progress=progress, should_stop=should_stop)
    del model
    with safe_open(str(base_path), "pt") as f:
        base_metadata = {k: v for k, v in (f.metadata() or {}).items() if k == sd1.CONFIG_METADATA_KEY}
    state = fused_state_dict(read_base_state_dict(base_path), result, dtype=dtype)
    if should_stop is not None and should_stop():
        raise FusionInterrupted("interrupted before writing")
    written = write_fused_checkpoint(state, out_path, fused_metadata(inputs, settings, result, base_metadata),
                                     overwrite=overwrite)
    return written, result
