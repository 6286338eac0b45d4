"""Gradient fusion (Mix-of-Show's center node): merge several ED-LoRA concepts into one model
without training data.

For every fused linear layer we find W minimising sum_i ||W X_i - W_i X_i||^2, where W_i is
concept i's own weight (W0 + weight * dW_i) and X_i are that layer's inputs while concept i's own
model processes concept i. Three stages, as the authors run them (DESIGN.md section 4):

1. text encoder (q/k/v/out of 12 layers): X_i from concept i's own encoder on its bound prompts
   "photo of a {tokens}" and "{tokens}" (16 layer copies each), all positions up to the EOS;
2. UNet attn2 to_k / to_v: X_i = the fused encoder's output for the layer-l copies at the concept
   token and EOS positions, for attn2 layer l;
3. spatial layers (attn1 q/k/v/out, attn2 q/out): concept i's spatial LoRA over the fused k/v,
   one seeded sample of "photo of a {tokens}" without CFG, inputs recorded at every step.

Unlike the authors, activations are never stored: forward pre-hooks stream them into per-layer
Gram statistics (`fusion_solver.LayerStats`) and each layer is solved exactly in float64. The
live model is restored bit for bit afterwards, also on error or interrupt.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lib_mos import sampling
from lib_mos.binding import PromptBinder
from lib_mos.concept_files import torch_load_weights
from lib_mos.concepts import Concept, ConceptError, applied, check_fits
from lib_mos.fusion_solver import LayerStats, relative_errors_many, solve_exact, solve_lbfgs, weight_average
from lib_mos.sd1 import ATTN2_NAMES, SD1Model

STAGES = ("te", "kv", "spatial")
PROMPT_TEMPLATES = ("photo of a {}", "{}")
LBFGS_ITERATIONS = {"te": 500, "kv": 500, "spatial": 50}
KV_PROJECTIONS = ("to_k", "to_v")


class FusionInterrupted(Exception):
    """The caller asked to stop; nothing was written and the model is restored."""


@dataclass
class FusionInput:
    """One concept to fuse, with the weights its LoRA is merged at (the authors' alphas)."""

    concept: Concept
    unet_weight: float = 1.0
    text_weight: float = 1.0


@dataclass
class FusionSettings:
    solver: str = "exact"  # or "lbfgs": the authors' optimiser, for comparison
    spatial_steps: int = 20
    spatial_size: int = 512
    seed: int = 0
    skip: frozenset[str] = frozenset()
    ridge: float = 1e-6

    def __post_init__(self) -> None:
        if self.solver not in ("exact", "lbfgs"):
            raise ValueError(f"solver must be 'exact' or 'lbfgs', got {self.solver!r}")
        unknown = set(self.skip) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) to skip: {sorted(unknown)}; stages are {', '.join(STAGES)}")
        if self.spatial_size % 8 or self.spatial_size <= 0:
            raise ValueError(f"spatial size must be a positive multiple of 8, got {self.spatial_size}")
        if self.spatial_steps <= 0:
            raise ValueError(f"spatial steps must be positive, got {self.spatial_steps}")


@dataclass
class FusionResult:
    text_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # transformers names
    unet_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # ldm names (in the UNet)
    report: list[dict] = field(default_factory=list)  # {"concept", "stage", "layers", "fused", "average"}
    seconds: dict[str, float] = field(default_factory=dict)
    concepts: list[Concept] = field(default_factory=list)


Progress = Callable[[str, int, int], None]  # (what, done, total)


def prompts_for(concept: Concept) -> list[str]:
    name = " ".join(concept.tokens)
    return [t.format(name) for t in PROMPT_TEMPLATES]


def check_inputs(model: SD1Model, inputs: Sequence[FusionInput]) -> None:
    """Refuse what cannot be fused before any work starts."""
    if not inputs:
        raise ConceptError("no concepts to fuse")
    seen: dict[str, str] = {}
    for item in inputs:
        c = item.concept
        where = c.source_path or c.name
        if c.source_sha256 and c.source_sha256 in seen:
            raise ConceptError(f"{where}: the same concept file is listed twice (also {seen[c.source_sha256]})")
        if c.source_sha256:
            seen[c.source_sha256] = where
        check_fits(c, model.unet, model.text_encoder)
        if c.layers != len(ATTN2_NAMES):
            raise ConceptError(f"{where}: {c.layers} embedding layers, the model has {len(ATTN2_NAMES)} attn2 layers")
    PromptBinder(model, [i.concept for i in inputs])  # duplicate tokens across concepts


@contextmanager
def _weights(root: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily replace linear weights; the original tensors are put back in `finally`."""
    saved = []
    try:
        for name, w in weights.items():
            lin = root.get_submodule(name)
            saved.append((lin, lin.weight.data))
            lin.weight.data = w.to(lin.weight.device, lin.weight.dtype)
        yield
    finally:
        for lin, original in reversed(saved):
            lin.weight.data = original


@contextmanager
def _recording(root: nn.Module, stats: dict[str, LayerStats],
               select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[None]:
    """Stream every input of the named linears into its statistics (hooks removed in `finally`)."""
    handles = []
    try:
        for name, st in stats.items():
            def hook(module, args, _st=st):
                x = args[0]
                _st.add(select(x) if select is not None else x)

            handles.append(root.get_submodule(name).register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _delta(st: LayerStats, concept: Concept, lora: str, name: str, weight: float) -> torch.Tensor:
    """dW_i of one layer at the concept's merge weight (zero where the concept has no LoRA)."""
    f = (concept.unet_lora if lora == "unet" else concept.text_lora).get(name)
    if f is None or weight == 0:
        return torch.zeros_like(st.w0, dtype=torch.float64)
    return weight * f.delta(torch.float64).to(st.w0.device)


def _new_stats(root: nn.Module, names: Sequence[str], device: torch.device, *, dense: bool = True
               ) -> dict[str, LayerStats]:
    """Per-layer statistics: float32 per-concept report factors are spilled to disk; the solve's
    G and S are dense float64 (memory independent of the concept count) or, for layers that see a
    handful of rows per concept (attn2 k/v: 6), raw rows until they outgrow a dense Gram (smaller
    and faster there, and bounded by the dense size)."""
    return {n: LayerStats(root.get_submodule(n).weight.data.float(), device=device,
                          per_concept_dtype=torch.float32, dense=dense) for n in names}


def _end_concept(stats: dict[str, LayerStats], spill_dir: str) -> None:
    """Close the concept in every layer and move its report statistics out of memory."""
    from pathlib import Path

    for st in stats.values():
        st.end_concept()
        st.spill(Path(spill_dir))


def _solve(stage: str, stats: dict[str, LayerStats], settings: FusionSettings, progress: Progress | None,
           should_stop: Callable[[], bool] | None) -> dict[str, torch.Tensor]:
    out = {}
    for k, (name, st) in enumerate(stats.items()):
        if should_stop is not None and should_stop():
            raise FusionInterrupted(f"interrupted while solving the {stage} stage")
        if settings.solver == "exact":
            out[name] = solve_exact(st, ridge=settings.ridge)
        else:
            out[name] = solve_lbfgs(st, iterations=LBFGS_ITERATIONS[stage])
        if progress:
            progress(f"{stage}: solving", k + 1, len(stats))
    return out


def _report(stage: str, inputs: Sequence[FusionInput], stats: dict[str, LayerStats],
            fused: dict[str, torch.Tensor]) -> list[dict]:
    """Per concept: mean over the stage's layers of the relative output error, fused vs averaged."""
    if not stats:
        return []
    both = [relative_errors_many([fused[n], weight_average(st)], st) for n, st in stats.items()]
    fused_err = torch.tensor([b[0] for b in both], dtype=torch.float64)
    avg_err = torch.tensor([b[1] for b in both], dtype=torch.float64)
    return [{"concept": item.concept.name, "stage": stage, "layers": len(stats),
             "fused": float(fused_err[:, i].mean()), "average": float(avg_err[:, i].mean())}
            for i, item in enumerate(inputs)]


def _first_eos_mask(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """True at every position up to and including the first EOS (the unpadded tokens)."""
    is_eos = ids == eos
    return (is_eos.cumsum(1) - is_eos.long()) == 0


def fuse(model: SD1Model, inputs: Sequence[FusionInput], settings: FusionSettings | None = None, *,
         progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> FusionResult:
    """Fuse `inputs` into `model`'s weights; returns the fused weights of every layer a concept
    changes (float32, CPU) and the report. `model` is unchanged afterwards. The per-concept report
    statistics wait in a temporary folder, so memory does not grow with the number of concepts."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mos-fusion-") as spill_dir:
        return _fuse(model, inputs, settings or FusionSettings(), progress, should_stop, spill_dir)


@torch.no_grad()
def _fuse(model: SD1Model, inputs: Sequence[FusionInput], settings: FusionSettings, progress: Progress | None,
          should_stop: Callable[[], bool] | None, spill_dir: str) -> FusionResult:
    check_inputs(model, inputs)
    te, unet = model.text_encoder, model.unet
    device = next(unet.parameters()).device
    eos = model.tokenizer.eos_token_id
    result = FusionResult(concepts=[i.concept for i in inputs])

    def stop_check(where: str) -> None:
        if should_stop is not None and should_stop():
            raise FusionInterrupted(f"interrupted during the {where} stage")

    # ---- stage 1: text encoder
    text_names = sorted({n for i in inputs for n in i.concept.text_lora})
    if "te" not in settings.skip and text_names:
        t0 = time.perf_counter()
        stats = _new_stats(te, text_names, device)
        mask: list[torch.Tensor] = []

        def remember_mask(module, args, kwargs):
            mask[:] = [_first_eos_mask(kwargs["input_ids"], eos)]

        for k, item in enumerate(inputs):
            stop_check("text encoder")
            for n, st in stats.items():
                st.begin_concept(delta=_delta(st, item.concept, "text", n, item.text_weight))
            handle = te.register_forward_pre_hook(remember_mask, with_kwargs=True)
            try:
                with applied([(item.concept, 0.0, item.text_weight)], unet, te), \
                        _recording(te, stats, select=lambda x: x[mask[0]]):
                    PromptBinder(model, [item.concept]).encode(prompts_for(item.concept))
            finally:
                handle.remove()
            _end_concept(stats, spill_dir)
            if progress:
                progress("te: recording", k + 1, len(inputs))
        result.text_weights = _solve("te", stats, settings, progress, should_stop)
        result.report += _report("te", inputs, stats, result.text_weights)
        result.seconds["te"] = time.perf_counter() - t0
        del stats

    # ---- stage 2: attn2 to_k / to_v from the fused text encoder
    kv_names = [f"{a}.{p}" for a in ATTN2_NAMES for p in KV_PROJECTIONS]
    kv_names = [n for n in kv_names if any(n in i.concept.unet_lora for i in inputs)]
    if "kv" not in settings.skip and kv_names:
        t0 = time.perf_counter()
        stats = _new_stats(unet, kv_names, device, dense=False)
        with _weights(te, result.text_weights):
            for k, item in enumerate(inputs):
                stop_check("cross-attention k/v")
                binder = PromptBinder(model, [item.concept])
                prompts = prompts_for(item.concept)
                z = binder.encode(prompts)  # [P, L, 77, D]
                rows = []
                for p, prompt in enumerate(prompts):
                    ids, slots = binder.tokenize_bound(prompt)
                    positions = [pos for pos, _ in slots] + [ids.index(eos)]
                    rows.append(z[p][:, positions])  # [L, n_pos, D]
                feats = torch.cat(rows, dim=1)
                for n, st in stats.items():
                    layer = ATTN2_NAMES.index(n.rsplit(".", 1)[0])
                    st.begin_concept(delta=_delta(st, item.concept, "unet", n, item.unet_weight))
                    st.add(feats[layer])
                _end_concept(stats, spill_dir)
                if progress:
                    progress("kv: recording", k + 1, len(inputs))
        result.unet_weights.update(_solve("kv", stats, settings, progress, should_stop))
        result.report += _report("kv", inputs, stats, {n: result.unet_weights[n] for n in stats})
        result.seconds["kv"] = time.perf_counter() - t0
        del stats

    # ---- stage 3: spatial layers, recorded while sampling each concept with its own spatial LoRA
    kv_set = {f"{a}.{p}" for a in ATTN2_NAMES for p in KV_PROJECTIONS}
    spatial_names = sorted({n for i in inputs for n in i.concept.unet_lora if n not in kv_set})
    if "spatial" not in settings.skip and spatial_names:
        t0 = time.perf_counter()
        stats = _new_stats(unet, spatial_names, device)
        fused_kv = {n: w for n, w in result.unet_weights.items() if n in kv_set}
        with _weights(te, result.text_weights), _weights(unet, fused_kv):
            for k, item in enumerate(inputs):
                stop_check("spatial")
                spatial_only = dataclasses.replace(
                    item.concept, text_lora={},
                    unet_lora={n: f for n, f in item.concept.unet_lora.items() if n not in kv_set})
                for n, st in stats.items():
                    st.begin_concept(delta=_delta(st, item.concept, "unet", n, item.unet_weight))
                cond = PromptBinder(model, [item.concept]).encode(prompts_for(item.concept)[:1])

                def on_step(step: int, x: torch.Tensor, _k=k) -> None:
                    stop_check("spatial")
                    if progress:
                        progress(f"spatial: sampling concept {_k + 1}/{len(inputs)}", step + 1, settings.spatial_steps)

                with applied([(spatial_only, item.unet_weight, 0.0)], unet, te), _recording(unet, stats):
                    sampling.sample_euler(model, cond.to(device), None, seeds=[settings.seed],
                                          height=settings.spatial_size, width=settings.spatial_size,
                                          steps=settings.spatial_steps, cfg_scale=1.0, callback=on_step)
                _end_concept(stats, spill_dir)
        result.unet_weights.update(_solve("spatial", stats, settings, progress, should_stop))
        result.report += _report("spatial", inputs, stats, {n: result.unet_weights[n] for n in stats})
        result.seconds["spatial"] = time.perf_counter() - t0
        del stats

    result.text_weights = {n: w.float().cpu() for n, w in result.text_weights.items()}
    result.unet_weights = {n: w.float().cpu() for n, w in result.unet_weights.items()}
    return result


# ------------------------------------------------------------------------------ fused checkpoints
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
    from lib_mos.sd1 import TEXT_PREFIX, UNET_PREFIX

    sd = dict(base)
    sd.pop(_POSITION_IDS, None)
    for prefix, weights in ((TEXT_PREFIX, result.text_weights), (UNET_PREFIX, result.unet_weights)):
        for name, w in weights.items():
            key = f"{prefix}{name}.weight"
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
        "concepts": [{"name": i.concept.name, "tokens": list(i.concept.tokens), "layers": i.concept.layers,
                      "class_word": i.concept.class_word, "source_sha256": i.concept.source_sha256,
                      "unet_weight": i.unet_weight, "text_weight": i.text_weight} for i in inputs],
        "settings": {**dataclasses.asdict(settings), "skip": sorted(settings.skip)},
        "report": result.report,
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
                concepts.append(Concept(name=c["name"], tokens=tuple(c["tokens"]), embeddings=torch.stack(rows),
                                        class_word=c.get("class_word"), source_path=str(path),
                                        source_sha256=c.get("source_sha256")))
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
    files trained with the same token names be fused) and its merge weights."""

    path: str
    tokens: tuple[str, ...] | None = None
    unet_weight: float = 1.0
    text_weight: float = 1.0


def parse_concept_spec(spec: str, unet_weight: float = 1.0, text_weight: float = 1.0) -> ConceptSpec:
    """`FILE` or `FILE:<new1>+<new2>` (the part after the last ':' is tokens only if it starts with
    '<', so Windows drive letters stay part of the path)."""
    path, tokens = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and tail.startswith("<"):
        path, tokens = head, tuple(t.strip() for t in tail.split("+"))
        if not all(tokens):
            raise ConceptError(f"{spec}: empty token name in the renaming")
    return ConceptSpec(path, tokens, unet_weight, text_weight)


def load_inputs(specs: Sequence[ConceptSpec]) -> list[FusionInput]:
    """Read every concept file, apply renames, and check the set (unique, non-nested tokens)."""
    from lib_mos.concept_files import check_concept_set, read_concept, sha256_file

    inputs = []
    seen: dict[str, str] = {}
    for spec in specs:
        concept = read_concept(spec.path)
        identity = concept.source_sha256 or sha256_file(spec.path)  # the original training output, else the file
        if identity in seen:
            raise ConceptError(f"{spec.path}: the same concept is listed twice (also {seen[identity]})")
        seen[identity] = spec.path
        if spec.tokens is not None:
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

    from lib_mos import sd1

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


def format_report(report: Sequence[dict]) -> str:
    """The report as a text table: relative output error of the fused model vs weight averaging."""
    lines = [f"{'concept':<20} {'stage':<8} {'layers':>6} {'fused':>10} {'averaged':>10}"]
    for r in report:
        lines.append(f"{r['concept'][:20]:<20} {r['stage']:<8} {r['layers']:>6} {r['fused']:>10.4f} {r['average']:>10.4f}")
    return "\n".join(lines)
