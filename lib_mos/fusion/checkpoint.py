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
from lib_mos.fusion.pipeline import (
    FusionInput,
    FusionInterrupted,
    FusionResult,
    FusionSettings,
    Progress,
    fuse,
)
from lib_mos.models.family import SD1, ModelFamily
from lib_mos.tensorfile import Entry, TensorFile, write_tensor

FUSED_METADATA_KEY = "mos_fusion"
FUSED_EMBEDDING_PREFIX = "mos_fusion.embedding."


def _text_target(family: ModelFamily, name: str, attr: str) -> tuple[str, int | None]:
    """The base-file key holding text layer `name` (rooted at the model's text root) and, where
    the host stacks q/k/v into one OpenCLIP `in_proj` tensor (SDXL's bigG), which third of its
    rows the layer is."""
    from lib_mos.models import sdxl

    spec = next((t for t in family.text_encoders if name.startswith(t.root)), None)
    if spec is None:
        raise ConceptError(f"fused text layer {name} belongs to no {family.label} text encoder")
    rest = f"{name[len(spec.root):]}.{attr}"
    if spec.checkpoint_prefix != sdxl.TE2_PREFIX:
        return spec.checkpoint_prefix + rest, None
    try:
        key, third = sdxl.te2_file_key(rest)
    except KeyError as e:
        raise ConceptError(f"fused text layer {name}: {e.args[0]}") from None
    return spec.checkpoint_prefix + key, third


def _is_position_ids(family: ModelFamily, key: str) -> bool:
    """A text encoder's position_ids: derived by every loader, and some files carry a corrupt copy."""
    return key.endswith("embeddings.position_ids") and key.startswith(
        tuple(t.checkpoint_prefix for t in family.text_encoders))


def _with_rows(stacked: torch.Tensor, parts: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """`stacked` (q, k, v rows on top of each other) with the given thirds replaced."""
    n = stacked.shape[0] // 3
    for third, value in parts:
        stacked[third * n:(third + 1) * n] = value
    return stacked


def fused_entries(base: TensorFile, result: FusionResult, *, dtype: torch.dtype = torch.float16,
                  family: ModelFamily | None = None) -> list[Entry]:
    """What the fused checkpoint holds, as `write_safetensors_streaming` entries over the open
    base file: every base tensor (position_ids dropped) in the base's order, the fused layers
    replaced, then the concept embeddings under a private prefix the host ignores. Floats are
    cast to `dtype` except `alphas_cumprod` and the embeddings (float32). Tensors pass through
    as raw bytes when their dtype stays, else are read and cast one at a time; every key and
    shape is checked here, before anything is written."""
    from lib_mos.models.checkpoints import family_of_checkpoint
    from lib_mos.models.sd1 import _canonical_key

    family = family or family_of_checkpoint(base.path)
    if not any(k.startswith(family.unet_prefix) for k in base):
        raise ConceptError(f"{base.path}: not an SD1 or SDXL checkpoint (no {family.unet_prefix}* keys)")
    canon = {_canonical_key(k): k for k in base}  # SD1's pre-`text_model.` text keys, as the host reads them
    # (third or None, a getter): fused tensors are read when their turn comes (a fusion may keep
    # them on disk: `memory.DiskTensors`)
    changes: dict[str, list[tuple[int | None, Callable[[], torch.Tensor]]]] = {}
    tables = ((True, result.text_weights, "weight"), (False, result.unet_weights, "weight"),
              (True, result.text_biases, "bias"), (False, result.unet_biases, "bias"))
    for text, weights, attr in tables:
        shape_of = getattr(weights, "shape_of", None)
        for name in weights:
            w_shape = shape_of(name) if shape_of is not None else tuple(weights[name].shape)
            key, third = _text_target(family, name, attr) if text else (f"{family.unet_prefix}{name}.{attr}", None)
            if key not in canon:
                raise ConceptError(f"{base.path}: base checkpoint has no key {key}")
            key = canon[key]
            shape = base.shape(key)
            want = tuple(w_shape) if third is None else (3 * w_shape[0], *w_shape[1:])
            if shape != want:
                what = "fused weight" if third is None else "fused q/k/v third"
                raise ConceptError(f"base checkpoint key {key} is {shape}, {what} {tuple(w_shape)}")
            changes.setdefault(key, []).append((third, lambda n=name, t=weights: t[n]))

    keep = ("alphas_cumprod", FUSED_EMBEDDING_PREFIX)
    entries: list[Entry] = []
    for key in base:
        # a fused base's own concept rows go: the new metadata lists only the new concepts
        if _is_position_ids(family, _canonical_key(key)) or key.startswith(FUSED_EMBEDDING_PREFIX):
            continue
        stored = base.dtype(key)
        out = dtype if stored.is_floating_point and not key.startswith(keep) else stored
        parts = changes.get(key)
        if parts is not None and parts[0][0] is None:
            source = lambda f, g=parts[0][1], o=out: write_tensor(f, g().to(o))  # noqa: E731
        elif parts is not None:
            source = (lambda f, k=key, o=out, p=parts:  # noqa: E731 - one closure per key
                      write_tensor(f, _with_rows(base.read(k, o), [(t, g().to(o)) for t, g in p])))
        elif out == stored:
            source = lambda f, k=key: base.copy_raw(k, f)  # noqa: E731
        else:
            source = lambda f, k=key, o=out: write_tensor(f, base.read(k, o))  # noqa: E731
        entries.append((key, out, base.shape(key), source))
    k = 0
    for concept in result.concepts:
        for token in concept.tokens:
            rows = concept.token_rows(token).float()
            entries.append((f"{FUSED_EMBEDDING_PREFIX}{k}", torch.float32, tuple(rows.shape), rows))
            k += 1
    return entries


def fused_metadata(inputs: Sequence[FusionInput], settings: FusionSettings, result: FusionResult,
                   base_metadata: dict[str, str] | None = None, family: ModelFamily | None = None) -> dict[str, str]:
    """The `mos_fusion` JSON (concepts, settings, report; `family`: the base's, else the
    concepts') over the base metadata that is kept."""
    import json

    family = family or (inputs[0].concept.family if inputs else SD1)
    info = {
        "format": "mos-fused", "version": 1, "family": family.name,
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
    """The concepts carried by a fused checkpoint (embeddings only: their LoRA is in the weights),
    for the family the file names (files from before the field are SD1)."""
    import json

    from lib_mos.models.family import family_named
    from lib_mos.tensorfile import TensorFile

    try:
        with TensorFile(path) as f:
            meta = f.metadata.get(FUSED_METADATA_KEY)
            if meta is None:
                return []
            info = json.loads(meta)
            family = family_named(info.get("family", SD1.name))
            concepts, k = [], 0
            for c in info["concepts"]:
                rows = []
                for _ in c["tokens"]:
                    rows.append(f.read(f"{FUSED_EMBEDDING_PREFIX}{k}", torch.float32))
                    k += 1
                # a trigger-word concept has no rows: its words are plain prompt text
                embeddings = torch.stack(rows) if rows else torch.zeros(0, c.get("layers", family.layers), 0)
                concepts.append(Concept(name=c["name"], tokens=tuple(c["tokens"]), embeddings=embeddings,
                                        class_word=c.get("class_word"), triggers=tuple(c.get("triggers", ())),
                                        source_path=str(path), source_sha256=c.get("source_sha256"),
                                        family=family))
            return concepts
    except (OSError, KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise ConceptError(f"{path}: broken fused-concept data ({type(e).__name__}: {e})") from e


def write_fused_checkpoint(base_path, result: FusionResult, path, metadata: dict[str, str], *,
                           dtype: torch.dtype = torch.float16, overwrite: bool = False):
    """Stream the fused checkpoint (`fused_entries`) from the base file to `path`: the peak is one
    tensor, not a state dict. Atomic (temporary file, then rename); an existing file is kept
    unless `overwrite`. Errors reading the base are ConceptErrors naming it."""
    from lib_mos.files import write_safetensors_streaming

    try:
        base = TensorFile(base_path)
    except (OSError, ValueError) as e:  # both name the file
        raise ConceptError(str(e)) from e
    with base:
        entries = fused_entries(base, result, dtype=dtype)
        return write_safetensors_streaming(path, entries, metadata=metadata, overwrite=overwrite)


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


def load_inputs(specs: Sequence[ConceptSpec], family: ModelFamily = SD1) -> list[FusionInput]:
    """Read every concept file (with its spec's trigger words; a spec's `concept` when already
    read), apply renames, and check the set (unique, non-nested tokens)."""
    from lib_mos.concepts.files import check_concept_set, read_concept, sha256_file

    inputs = []
    seen: dict[str, str] = {}
    for spec in specs:
        concept = spec.concept if spec.concept is not None else read_concept(spec.path, trigger=spec.trigger,
                                                                             family=family)
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
                    model_dtype: torch.dtype | None = None, progress: Progress | None = None,
                    should_stop: Callable[[], bool] | None = None) -> tuple[object, FusionResult]:
    """Base checkpoint file (SD1 or SDXL: the file says which) + concept files -> a new fused
    checkpoint file. Everything that can be checked is checked before the work starts; the file
    appears only when complete. `model_dtype` is the base model's dtype during the fusion (None:
    float32 for SD1; SDXL is 7 GB in half precision, bfloat16 on the CPU, float16 on a GPU);
    `dtype` that of the saved weights. The returned result has the report; its weight tables are
    empty (the fused weights waited on disk and are in the file)."""
    from pathlib import Path

    from lib_mos.models import checkpoints

    settings = settings or FusionSettings()
    out_path, base_path = Path(out_path), Path(base_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path}: already exists (choose another name or allow overwriting)")
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"{out_path.parent}: no such folder")
    if base_path.suffix.lower() != ".safetensors":
        raise ConceptError(f"{base_path}: the base checkpoint must be a .safetensors file")
    try:
        family = checkpoints.family_of_checkpoint(base_path)
    except (ValueError, FileNotFoundError) as e:
        raise ConceptError(str(e)) from e
    inputs = load_inputs(specs, family)
    try:
        if model_dtype is None:
            half = torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
            model_dtype = torch.float32 if family is SD1 else half
        # the UNet is read when a stage needs it (`CheckpointWeights`)
        model = checkpoints.load_checkpoint(base_path, device=device, dtype=model_dtype, unet=False)
        if model_dtype != torch.float32:
            # ldm's GroupNorm32 normalises in float32 and the CPU's kernels want float32 parameters
            # for it (kilobytes): the sampler runs the rest under autocast (`sampling.Denoiser`)
            for module in model.unet.modules():
                if isinstance(module, torch.nn.GroupNorm | torch.nn.LayerNorm):
                    module.float()
    except (ValueError, FileNotFoundError) as e:
        raise ConceptError(str(e)) from e
    # the text encoders and the UNet are in memory only while a stage needs them (`fusion.memory`)
    import tempfile

    from lib_mos.models.checkpoint_parts import CheckpointWeights

    with tempfile.TemporaryDirectory(prefix="mos-fused-") as store:
        # the fused weights wait on disk (SDXL's are 5 GB in float32), the writer reads them in turn
        result = fuse(model, inputs, settings, progress=progress, should_stop=should_stop,
                      weights=CheckpointWeights(base_path, model), store=store)
        del model
        written = _write_result(base_path, out_path, inputs, settings, result, family, dtype, overwrite, should_stop)
    # their store is gone: the weights are in the written file
    return written, dataclasses.replace(result, text_weights={}, unet_weights={}, text_biases={}, unet_biases={})


def _write_result(base_path, out_path, inputs: Sequence[FusionInput], settings: FusionSettings, result: FusionResult,
                  family: ModelFamily, dtype: torch.dtype, overwrite: bool,
                  should_stop: Callable[[], bool] | None) -> object:
    """The fused checkpoint file from the base file and the result (while its store exists)."""
    from lib_mos.models import sd1, sdxl

    config_key = sd1.CONFIG_METADATA_KEY if family is SD1 else sdxl.CONFIG_METADATA_KEY
    with TensorFile(base_path) as f:
        base_metadata = {k: v for k, v in f.metadata.items() if k == config_key}
    if should_stop is not None and should_stop():
        raise FusionInterrupted("interrupted before writing")
    metadata = fused_metadata(inputs, settings, result, base_metadata, family=family)
    return write_fused_checkpoint(base_path, result, out_path, metadata, dtype=dtype, overwrite=overwrite)
