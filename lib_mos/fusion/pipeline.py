"""Gradient fusion (Mix-of-Show's center node): merge several ED-LoRA concepts into one model
without training data.

For every fused linear layer we find W minimising sum_i ||W X_i - W_i X_i||^2, where W_i is
concept i's own weight (W0 + weight * dW_i) and X_i are that layer's inputs while concept i's own
model processes concept i. Three stages, as the authors run them (docs/method.md):

1. text encoder (q/k/v/out of 12 layers): X_i from concept i's own encoder on its bound prompts
   "photo of a {tokens}" and "{tokens}" (16 layer copies each), all positions up to the EOS;
2. UNet attn2 to_k / to_v: X_i = the fused encoder's output for the layer-l copies at the concept
   token and EOS positions, for attn2 layer l;
3. spatial layers (attn1 q/k/v/out, attn2 q/out): concept i's spatial LoRA over the fused k/v,
   `spatial_seeds` seeded samples of the two prompts in one batch without CFG, inputs recorded at
   every step.

Unlike the authors, activations are never stored: forward pre-hooks stream them into per-layer
Gram statistics (`fusion_solver.LayerStats`) and each layer is solved in float64, exactly where
the data determine it and toward the weight average where they do not. Each stage also records two
more sets of inputs the solve never sees (other prompts; in the spatial stage another seed each, as
more rows of the same batch): validation inputs choose each layer's regularisation, and held-out
inputs let the report (`fusion_report`) measure the fused weights, and their distance from the
base, and warn when either is out of bounds. The live model is restored bit for bit afterwards,
also on error or interrupt. Files in and out: `fused_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lib_mos import allocator
from lib_mos.concepts.binding import ENCODE_BATCH, PromptBinder
from lib_mos.concepts.concept import Concept, ConceptError, applied, check_fits, input_embedding_table
from lib_mos.fusion import check, memory
from lib_mos.fusion.report import PICTURE, LayerMeasure, measure_layers, stage_report
from lib_mos.fusion.solver import (
    MAX_CHANGE,
    PRIORS,
    RIDGE,
    LayerStats,
    solve_exact,
    solve_lbfgs,
)
from lib_mos.models import sampling
from lib_mos.models.attention import bounded_self_attention
from lib_mos.models.family import SD1, SDXL, ModelFamily
from lib_mos.models.sd1 import SD1Config, SD1Model
from lib_mos.models.sdxl import SDXLConfig, SDXLModel

Model = SD1Model | SDXLModel

STAGES = ("te", "kv", "spatial")
PROMPT_TEMPLATES = ("photo of a {}", "{}")  # the authors' two, around a concept's tokens
# Trigger words are ordinary words the LoRA was trained on inside captions, so they get the
# authors' two and a few of the usual caption forms.
TRIGGER_TEMPLATES = (*PROMPT_TEMPLATES, "a photo of {}", "a close-up photo of {}", "{}, high quality")
# Held-out prompts: recorded like the training ones but never solved from, so the report can measure
# how the fused weights do on inputs the solve did not see (the spatial stage also uses a seed of its own).
HELD_OUT_TEMPLATES = ("a close-up picture of {} outdoors", "{} next to a window")
# Validation prompts choose each layer's regularisation (fusion_solver.solve_exact); a third set, so
# the held-out errors stay an independent measure.
VALIDATION_TEMPLATES = ("a {} in the garden", "a painting of {}")
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
    ridge: float = RIDGE  # regularisation strength, relative to each layer's mean Gram eigenvalue
    # noise seeds per concept in the spatial stage (seed, seed + 1, ...), sampled as one batch:
    # more independent rows for the widest layers without larger images
    spatial_seeds: int = 4
    prior: str = "average"  # what W stays at where the data do not determine it (fusion_solver.PRIORS)
    max_change: float | None = MAX_CHANGE  # trust region: ||W - W0||_F <= this x sum_i ||dW_i||_F
    # record validation prompts and seed and pick each layer's ridge among fusion_solver.RIDGES on
    # them (else `ridge` everywhere)
    validate: bool = True
    held_out: bool = True  # record held-out prompts and a held-out seed for the report
    # the solve's prompt templates ("{}" = the concept's tokens or trigger words) for every concept;
    # None: PROMPT_TEMPLATES for token concepts, TRIGGER_TEMPLATES for trigger-word ones
    templates: tuple[str, ...] | None = None
    # what the whole process may hold on the CPU (the interpreter, the model parts a stage needs, a
    # batch's work and the statistics): layers whose statistics do not fit beside the rest are
    # recorded in further passes (one layer is never split: a budget too small for it is refused)
    memory_gb: float = 8.0
    # the same on a GPU, for the device's memory (None: 90 % of the card)
    vram_gb: float | None = None
    # weigh each concept's rows by 1 / ||dW_i X_i||^2 in every layer, so the solve minimises the sum
    # of the concepts' squared relative errors (what the report measures): a concept with a small
    # change or few rows (an ED-LoRA's 6 k/v rows beside a kohya LoRA's) is kept as well as the
    # others; False: the authors' plain sum of squared output errors
    balance: bool = True
    # the report's verdict (`fusion.check`): each concept's CFG-guided prediction along its own
    # model's sampling trajectory (check_seeds x check_steps at check_cfg), fused vs averaged vs
    # stacked; 0 steps: no check
    check_steps: int = 8
    check_seeds: int = 2
    check_cfg: float = 7.0

    def __post_init__(self) -> None:
        if self.solver not in ("exact", "lbfgs"):
            raise ValueError(f"solver must be 'exact' or 'lbfgs', got {self.solver!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise ValueError(f"ridge must be a finite non-negative number, got {self.ridge}")
        if self.spatial_seeds <= 0:
            raise ValueError(f"spatial seeds must be positive, got {self.spatial_seeds}")
        unknown = set(self.skip) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) to skip: {sorted(unknown)}; stages are {', '.join(STAGES)}")
        if self.spatial_size % 8 or self.spatial_size <= 0:
            raise ValueError(f"spatial size must be a positive multiple of 8, got {self.spatial_size}")
        if self.spatial_steps <= 0:
            raise ValueError(f"spatial steps must be positive, got {self.spatial_steps}")
        if self.check_steps < 0 or self.check_seeds <= 0:
            raise ValueError(f"check steps must be >= 0 and check seeds positive, got {self.check_steps}, "
                             f"{self.check_seeds}")
        if not (self.memory_gb > 0 and math.isfinite(self.memory_gb)):
            raise ValueError(f"memory budget must be a positive number of GiB, got {self.memory_gb}")
        if self.vram_gb is not None and not (self.vram_gb > 0 and math.isfinite(self.vram_gb)):
            raise ValueError(f"GPU memory budget must be a positive number of GiB, got {self.vram_gb}")
        if self.templates is not None:
            self.templates = tuple(self.templates)
            bad = [t for t in self.templates if not isinstance(t, str) or t.count("{}") != 1]
            if not self.templates or bad:
                raise ValueError(f"each prompt template needs exactly one '{{}}' for the concept, got {bad or 'none'}")


@dataclass
class FusionResult:
    # fused weights by module name (transformers names / ldm names in the UNet), in the layers' shapes
    # (plain dicts, or `memory.DiskTensors` when `fuse` was given a store)
    text_weights: MutableMapping[str, torch.Tensor] = field(default_factory=dict)
    unet_weights: MutableMapping[str, torch.Tensor] = field(default_factory=dict)
    # fused biases of the layers a concept's change includes a bias in (full diffs' `diff_b`)
    text_biases: MutableMapping[str, torch.Tensor] = field(default_factory=dict)
    unet_biases: MutableMapping[str, torch.Tensor] = field(default_factory=dict)
    report: list[dict] = field(default_factory=list)  # one row per concept and stage: see `_report`
    seconds: dict[str, float] = field(default_factory=dict)
    # the process's peak resident memory from its start to the end of each stage, MiB (Linux): a
    # stage that raises it shows the new figure
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    concepts: list[Concept] = field(default_factory=list)
    # one line each: held-out error or distance from the base out of bounds, too few spatial rows
    warnings: list[str] = field(default_factory=list)


Progress = Callable[[str, int, int], None]  # (what, done, total); what = "<stage>: <action>[: <layer>]"



def prompts_for(concept: Concept, templates: Sequence[str] = PROMPT_TEMPLATES) -> list[str]:
    """The templates around the concept's tokens, or its trigger words."""
    words = concept.prompt_words
    return [t.replace("{}", words, 1) for t in templates]


def solve_templates(concept: Concept, settings: FusionSettings) -> tuple[str, ...]:
    """The prompt templates the solve records for this concept (`FusionSettings.templates`)."""
    if settings.templates is not None:
        return settings.templates
    return TRIGGER_TEMPLATES if concept.triggers and not concept.tokens else PROMPT_TEMPLATES


def family_of_config(config: SD1Config | SDXLConfig) -> ModelFamily:
    """The family a model config belongs to."""
    return SDXL if isinstance(config, SDXLConfig) else SD1


def spatial_rows(config: SD1Config | SDXLConfig, settings: FusionSettings) -> list[tuple[str, int, int]]:
    """(attn2 block, rows per concept, input width) of every spatial layer group: the rows one
    concept's sampling records there (feature-map cells x steps x seeds)."""
    family = family_of_config(config)
    sizes = family.attention_sizes(settings.spatial_size, settings.spatial_size)
    widths = [config.model_channels * family.channel_mult[level] for level in family.attn2_levels]
    return [(name.rsplit(".transformer_blocks", 1)[0], h * w * settings.spatial_steps * settings.spatial_seeds, width)
            for name, (h, w), width in zip(family.attn2, sizes, widths)]


def spatial_shortfall(config: SD1Config | SDXLConfig, settings: FusionSettings) -> str | None:
    """A warning when the spatial settings record fewer rows per concept than the widest layers'
    input width (those layers are then partly undetermined and fall back to the weight average),
    naming the smallest step count that would do at this size and seed count; None when enough."""
    rows = spatial_rows(config, settings)
    block, got, width = min(rows, key=lambda r: r[1] / r[2])
    if got >= width:
        return None
    per_step = got // settings.spatial_steps
    need = -(-width // per_step)
    return (f"spatial: {settings.spatial_steps} step(s) x {settings.spatial_seeds} seed(s) at "
            f"{settings.spatial_size} px record {got} rows per concept in {block}, narrower than its "
            f"{width} inputs; directions they miss keep the weight average. Use at least {need} steps "
            f"at this size and seed count (or a larger size).")


def check_inputs(model: Model, inputs: Sequence[FusionInput]) -> None:
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
        check_fits(c, model.unet, model.text_root)
        if c.tokens and c.layers != model.family.layers:
            raise ConceptError(f"{where}: {c.layers} embedding layers, the model has {model.family.layers} attn2 layers")
    PromptBinder(model, [i.concept for i in inputs])  # other family, duplicate tokens across concepts


@contextmanager
def _weights(root: nn.Module, weights: dict[str, torch.Tensor], biases: dict[str, torch.Tensor] | None = None,
             ) -> Iterator[None]:
    """Temporarily replace layer weights (and biases); the original tensors are put back in `finally`."""
    saved = []
    try:
        for attr, table in (("weight", weights), ("bias", biases or {})):
            for name, w in table.items():
                layer = root.get_submodule(name)
                current = getattr(layer, attr)
                saved.append((current, current.data))
                current.data = w.to(current.device, current.dtype).reshape(current.shape)
        yield
    finally:
        for param, original in reversed(saved):
            param.data = original


@contextmanager
def fused_weights(model: Model, result: FusionResult) -> Iterator[None]:
    """`result`'s fused weights in the live model for the duration of the block (as if the fused
    checkpoint were loaded); the original tensors are put back afterwards."""
    with _weights(model.text_root, result.text_weights, result.text_biases), \
            _weights(model.unet, result.unet_weights, result.unet_biases):
        yield


def _layer_rows(layer: nn.Module, with_bias: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A layer's input -> the rows its weight multiplies: a linear's inputs as they are, a conv's
    input patches (`F.unfold`, in the order of the weight's [out, in * kh * kw] view); with a
    constant 1 appended when the fused weight carries the bias too."""
    import torch.nn.functional as F

    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or not isinstance(layer.padding, tuple):
            raise ConceptError(f"cannot fuse {layer}: grouped or string-padded convolutions are not supported")

        def rows(x: torch.Tensor) -> torch.Tensor:
            patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
            return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        def rows(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(-1, x.shape[-1])
    if not with_bias:
        return rows

    def rows_and_one(x: torch.Tensor) -> torch.Tensor:
        r = rows(x)
        return torch.cat([r, torch.ones(r.shape[0], 1, dtype=r.dtype, device=r.device)], dim=1)
    return rows_and_one


@contextmanager
def _recording(root: nn.Module, stats: dict[str, LayerStats], biased: frozenset[str] = frozenset(),
               select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[None]:
    """Stream every input of the named layers into its statistics (hooks removed in `finally`)."""
    handles = []
    try:
        for name, st in stats.items():
            layer = root.get_submodule(name)
            rows = _layer_rows(layer, name in biased)

            def hook(module, args, _st=st, _rows=rows):
                x = args[0]
                _st.add(_rows(select(x) if select is not None else x))

            handles.append(layer.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _delta(root: nn.Module, concept: Concept, lora: str, name: str, weight: float, with_bias: bool) -> torch.Tensor | None:
    """dW_i of one layer at the concept's merge weight as [out, in_unfolded (+1 for the bias)],
    float64; None where the concept does not change the layer."""
    f = (concept.unet_lora if lora == "unet" else concept.text_lora).get(name)
    if f is None or weight == 0:
        return None
    layer = root.get_submodule(name)
    base = layer.weight.data.to(torch.float64)
    change = weight * f.matrix(torch.float64, base=base).to(base.device)
    if with_bias:
        extra = f.bias_delta()
        column = (weight * extra.to(base.device, torch.float64) if extra is not None
                  else torch.zeros(change.shape[0], dtype=torch.float64, device=base.device))
        change = torch.cat([change, column[:, None]], dim=1)
    return change


def _base_matrix(layer: nn.Module, with_bias: bool) -> torch.Tensor:
    """W0 as [out, in_unfolded], with the bias as a last column when it is fused too."""
    w = layer.weight.data.float()
    w = w.reshape(w.shape[0], -1)
    if with_bias:
        w = torch.cat([w, layer.bias.data.float()[:, None]], dim=1)
    return w


@dataclass
class _StageStats:
    """A stage's per-layer statistics: for the solve, and report-only ones for the validation and
    held-out inputs (empty dicts when those are not recorded)."""

    solve: dict[str, LayerStats]
    valid: dict[str, LayerStats]
    held: dict[str, LayerStats]
    root: nn.Module
    biased: frozenset[str]  # layers whose bias is fused as well (a concept changes it)

    def sets(self, concept: Concept, settings: FusionSettings) -> list[tuple[dict[str, LayerStats], tuple[str, ...]]]:
        """(statistics, prompt templates for `concept`) of each recorded set."""
        return [(d, t) for d, t in ((self.solve, solve_templates(concept, settings)),
                                    (self.valid, VALIDATION_TEMPLATES), (self.held, HELD_OUT_TEMPLATES)) if d]


def _biased(inputs: Sequence[FusionInput], lora: str, names: Sequence[str]) -> frozenset[str]:
    """Layers where some concept changes the bias too."""
    return frozenset(n for n in names for i in inputs
                     if (f := (i.concept.unet_lora if lora == "unet" else i.concept.text_lora).get(n)) is not None
                     and f.bias_delta() is not None)


def _new_stats(root: nn.Module, names: Sequence[str], device: torch.device, settings: FusionSettings, *,
               dense: bool = True, biased: frozenset[str] = frozenset()) -> _StageStats:
    """Per-layer statistics. Float32 per-concept report factors are spilled to disk; the solve's G
    and S are dense float64 (memory independent of the concept count) or, for layers that see a
    handful of rows per concept (attn2 k/v: 6), raw rows until they outgrow a dense Gram (smaller
    and faster there, and bounded by the dense size). Validation and held-out statistics share the
    solve's W0 copy. Convolutions are linears over their unfolded input patches."""
    solve = {n: LayerStats(_base_matrix(root.get_submodule(n), n in biased), device=device,
                           per_concept_dtype=torch.float32, dense=dense, balanced=settings.balance) for n in names}

    def report_only(wanted: bool) -> dict[str, LayerStats]:
        return {n: LayerStats.held_out_for(st) for n, st in solve.items()} if wanted else {}

    use_valid = settings.validate and settings.solver == "exact"
    return _StageStats(solve, report_only(use_valid), report_only(settings.held_out), root, biased)


def _begin_concept(stats: _StageStats, item: FusionInput, lora: str) -> None:
    """Open the concept in every layer of every set; they share one delta tensor per layer."""
    weight = item.unet_weight if lora == "unet" else item.text_weight
    for n, st in stats.solve.items():
        delta = _delta(stats.root, item.concept, lora, n, weight, n in stats.biased)
        if delta is None:
            delta = torch.zeros_like(st.w0, dtype=torch.float64)
        for target in (stats.solve, stats.valid, stats.held):
            if n in target:
                target[n].begin_concept(delta=delta, copy=False)


def _end_concept(stats: _StageStats, spill_dir: str) -> None:
    """Close the concept in every layer and move its report statistics out of memory."""
    from pathlib import Path

    for target in (stats.solve, stats.valid, stats.held):
        for st in target.values():
            st.end_concept()
            st.spill(Path(spill_dir))


def _solve(stage: str, stats: _StageStats, settings: FusionSettings, progress: Progress | None,
           should_stop: Callable[[], bool] | None, weights_out: MutableMapping[str, torch.Tensor],
           biases_out: MutableMapping[str, torch.Tensor]) -> list[LayerMeasure]:
    """Solve, measure and store one layer at a time (float32 on the CPU, the bias column split off
    where it is fused too), so a pass never holds more than one layer's float64 solution; returns
    the measures, with what the exact solve chose (ridge, whether the cap acted)."""
    measured = []
    if progress:
        progress(f"{stage}: solving", 0, len(stats.solve))
    for k, (name, st) in enumerate(stats.solve.items()):
        if should_stop is not None and should_stop():
            raise FusionInterrupted(f"interrupted while solving the {stage} stage")
        info: dict = {}
        if settings.solver == "exact":
            w = solve_exact(st, ridge=settings.ridge, prior=settings.prior, max_change=settings.max_change,
                            validation=stats.valid.get(name), info=info)
        else:
            w = solve_lbfgs(st, iterations=LBFGS_ITERATIONS[stage])
        held = {name: stats.held[name]} if name in stats.held else {}
        measured += measure_layers({name: st}, held, {name: w}, {name: info})
        w = w.float().cpu()
        if name in stats.biased:
            w, biases_out[name] = w[:, :-1], w[:, -1].clone()
        weights_out[name] = w.reshape(stats.root.get_submodule(name).weight.shape)
        del w
        if progress:
            progress(f"{stage}: solving: {name}", k + 1, len(stats.solve))
    return measured


def _eos_position(ids: Sequence[int], eos: int) -> int:
    """Where a (bound) prompt's EOS is: its first EOS id (concept slots hold another placeholder)."""
    return list(ids).index(eos)


def _unpadded_mask(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """True at every position up to and including each row's EOS (SDXL's bigG pads with 0
    after it, CLIP-L with more EOS ids: both end at the first)."""
    n = (ids == eos).int().argmax(1, keepdim=True)
    return torch.arange(ids.shape[1], device=ids.device)[None] <= n


def fuse(model: Model, inputs: Sequence[FusionInput], settings: FusionSettings | None = None, *,
         progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
         weights: memory.Weights | None = None, store: str | os.PathLike[str] | None = None) -> FusionResult:
    """Fuse `inputs` into `model`'s weights; returns the fused weights of every layer a concept
    changes (float32, CPU), the report and its warnings. `model` is unchanged afterwards. The
    per-concept report statistics wait in a temporary folder, so memory does not grow with the
    number of concepts. `weights` loads the model's parts when a stage needs them and releases them
    after (a model read from a file holds the text encoders or the UNet, rarely both:
    `memory.Weights`); default: all in memory already. `store`: a folder (which must outlive the
    result's use) where the fused weights wait instead of memory (`memory.DiskTensors`)."""
    import tempfile

    result = FusionResult(concepts=[i.concept for i in inputs])
    if store is not None:
        for table in ("text_weights", "unet_weights", "text_biases", "unet_biases"):
            setattr(result, table, memory.DiskTensors(os.path.join(store, table)))
    with tempfile.TemporaryDirectory(prefix="mos-fusion-") as spill_dir:
        return _fuse(model, inputs, settings or FusionSettings(), progress, should_stop, spill_dir,
                     weights or memory.Resident(), result)


def _stash(spill_dir: str, key: str, value: Any) -> str:
    """Keep `value` (tensors in dicts, lists and tuples) in a .safetensors file of the fusion's
    temporary folder until it is needed: conditionings wait there while the text encoders are
    gone. (No pickle: the host replaces torch.load with a checker that refuses newer archives.)"""
    import json
    import os

    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def shape(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            name = str(len(tensors))
            tensors[name] = v.detach().cpu().contiguous()
            return name
        if isinstance(v, dict):
            return {"dict": {k: shape(x) for k, x in v.items()}}
        return {"list": [shape(x) for x in v]}

    path = os.path.join(spill_dir, f"stash-{key}.safetensors")
    tree = shape(value)
    save_file(tensors, path, metadata={"tree": json.dumps(tree), "device": str(_device_of(value))})
    return path


def _device_of(value: Any) -> torch.device:
    if isinstance(value, torch.Tensor):
        return value.device
    items = value.values() if isinstance(value, dict) else value
    return next((_device_of(x) for x in items), torch.device("cpu"))


def _unstash(path: str) -> Any:
    """What `_stash` kept, on the device it was on (tuples come back as tuples)."""
    import json

    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    device = torch.device(meta["device"])

    def build(node: Any) -> Any:
        if isinstance(node, str):
            return tensors[node].to(device)
        if "dict" in node:
            return {k: build(x) for k, x in node["dict"].items()}
        return tuple(build(x) for x in node["list"])

    return build(json.loads(meta["tree"]))


def _budget(settings: FusionSettings, device: torch.device) -> tuple[float, str]:
    """(GiB, the option that sets it) for what the fusion may hold where its statistics live: host
    memory for the whole process on the CPU; on a GPU the device's memory (`vram_gb`; default 90 %
    of what is free when the fusion starts, beside the model it has loaded: a WebUI may hold its
    own model on the card)."""
    if device.type == "cuda":
        if settings.vram_gb is not None:
            return settings.vram_gb, "--vram-gb"
        free, _ = torch.cuda.mem_get_info(device)
        return (0.9 * free + torch.cuda.memory_allocated(device)) / memory.GIB, "--vram-gb"
    return settings.memory_gb, "--memory-gb"


@torch.no_grad()
def _fuse(model: Model, inputs: Sequence[FusionInput], settings: FusionSettings, progress: Progress | None,
          should_stop: Callable[[], bool] | None, spill_dir: str, weights: memory.Weights,
          result: FusionResult) -> FusionResult:
    check_inputs(model, inputs)
    te, unet = model.text_root, model.unet
    weights.release("unet")  # the text stages need only the encoders (and the k/v layers)
    weights.load("text")
    family = model.family
    attn2 = family.attn2
    device = next(te.parameters()).device
    dtype = next(te.parameters()).dtype
    eos = model.tokenizer.eos_token_id
    names = [i.concept.name for i in inputs]
    budget_gb, budget_option = _budget(settings, device)

    def stop_check(where: str) -> None:
        if should_stop is not None and should_stop():
            raise FusionInterrupted(f"interrupted during the {where} stage")

    def solve_pass(stage: str, stats: _StageStats, weights_out: MutableMapping[str, torch.Tensor],
                   biases_out: MutableMapping[str, torch.Tensor]) -> list[LayerMeasure]:
        """Solve one recording pass's layers into the result's tables; their measures."""
        return _solve(stage, stats, settings, progress, should_stop, weights_out, biases_out)

    def finish(stage: str, measured: list[LayerMeasure], t0: float) -> None:
        result.report += stage_report(stage, names, measured, result.warnings)
        result.seconds[stage] = time.perf_counter() - t0
        peak(stage)

    def peak(stage: str) -> None:
        value = memory.peak_rss_mb()
        if value is not None:
            result.peak_rss_mb[stage] = round(value, 1)

    # one batch of layer copies through the widest encoder: the te and k/v stages' work
    text_work = max(memory.text_activation_bytes(input_embedding_table(e).shape[1], len(e.text_model.encoder.layers),
                                                 ENCODE_BATCH) for e in family.text_encoder_modules(te))

    # every stage's layers, and each later stage's budget checked now, before any work, with the
    # least it will hold (the stage checks again with what it holds then): a budget too small for
    # the spatial stage must not take the text stages' minutes to say so
    text_names = sorted({n for i in inputs for n in i.concept.text_lora})
    kv_set = {f"{a}.{p}" for a in attn2 for p in KV_PROJECTIONS}
    kv_names = [n for n in (f"{a}.{p}" for a in attn2 for p in KV_PROJECTIONS) if any(n in i.concept.unet_lora
                                                                                      for i in inputs)]
    do_kv = "kv" not in settings.skip and bool(kv_names)
    kv_biased = _biased(inputs, "unet", kv_names)
    spatial_names = sorted({n for i in inputs for n in i.concept.unet_lora if n not in kv_set})
    do_spatial = "spatial" not in settings.skip and bool(spatial_names)
    spatial_biased = _biased(inputs, "unet", spatial_names)
    train = settings.spatial_seeds
    extra = [VALIDATION_TEMPLATES[0]] * bool(settings.validate and settings.solver == "exact")
    extra += [HELD_OUT_TEMPLATES[0]] * bool(settings.held_out)
    size = settings.spatial_size
    recorded = [(n, unet.get_submodule(n).weight[0].numel() + (n in spatial_biased)) for n in spatial_names]
    spatial_work = memory.unet_activation_bytes(family, model.config.model_channels, size, train + len(extra), dtype,
                                                recorded)
    do_te = "te" not in settings.skip and bool(text_names)
    text_biased = _biased(inputs, "text", text_names)
    te_budget = memory.stats_budget(budget_gb, "te", memory.resident_bytes(unet, te), text_work, te, text_names,
                                    text_biased, budget_option) if do_te else 0
    if do_kv:
        memory.stats_budget(budget_gb, "kv", memory.resident_bytes(te) + memory.resident_bytes(
            *(unet.get_submodule(n) for n in kv_names), planned=True), text_work, unet, kv_names, kv_biased, budget_option, dense=False)
    if do_spatial:
        memory.stats_budget(budget_gb, "spatial", memory.resident_bytes(unet, planned=True), spatial_work, unet, spatial_names,
                            spatial_biased, budget_option)

    # ---- stage 1: text encoder, every layer a concept changes, in as many passes as the budget needs
    if do_te:
        t0 = time.perf_counter()
        biased = text_biased
        encoders = family.text_encoder_modules(te)
        groups = memory.passes(te, text_names, biased, te_budget)
        mask: list[torch.Tensor] = []
        measured: list[LayerMeasure] = []

        def remember_mask(module, args, kwargs):
            # each encoder's own ids: the layers recorded next belong to it
            mask[:] = [_unpadded_mask(kwargs["input_ids"], eos)]

        for g, group in enumerate(groups):
            stats = _new_stats(te, group, device, settings, biased=biased)
            label = "te: recording" + (f" (pass {g + 1}/{len(groups)})" if len(groups) > 1 else "")
            if progress:
                progress(label, 0, len(inputs))
            for k, item in enumerate(inputs):
                stop_check("text encoder")
                _begin_concept(stats, item, "text")
                binder = PromptBinder(model, [item.concept])
                handles = [e.register_forward_pre_hook(remember_mask, with_kwargs=True) for e in encoders]
                try:
                    with applied([(item.concept, 0.0, item.text_weight)], unet, te, weights.changed):
                        for target, templates in stats.sets(item.concept, settings):
                            with _recording(te, target, stats.biased, select=lambda x: x[mask[0]]):
                                binder.encode_to_eos(prompts_for(item.concept, templates))
                finally:
                    for handle in handles:
                        handle.remove()
                _end_concept(stats, spill_dir)
                if progress:
                    progress(label, k + 1, len(inputs))
            measured += solve_pass("te", stats, result.text_weights, result.text_biases)
            del stats
            allocator.trim()  # the pass's smaller buffers, freed into glibc's heap
        finish("te", measured, t0)

    # ---- stage 2: attn2 to_k / to_v from the fused text encoder (only those UNet layers loaded)
    fused_te = (result.text_weights, result.text_biases)
    if do_kv:
        t0 = time.perf_counter()
        weights.load("unet", kv_names)
        # each layer holds W0, the open change and the sum of changes ([out, 2048] each): 5.9 GB for
        # SDXL's 140, so they too go in passes (re-encoding the prompts costs little up to the EOS)
        budget = memory.stats_budget(budget_gb, "kv", memory.resident_bytes(unet, te), text_work, unet, kv_names,
                                     kv_biased, budget_option, dense=False)
        groups = memory.passes(unet, kv_names, kv_biased, budget, dense=False)
        measured = []
        with weights.swapped(te, "text", *fused_te):
            for g, group in enumerate(groups):
                stats = _new_stats(unet, group, device, settings, dense=False, biased=kv_biased)
                label = "kv: recording" + (f" (pass {g + 1}/{len(groups)})" if len(groups) > 1 else "")
                if progress:
                    progress(label, 0, len(inputs))
                for k, item in enumerate(inputs):
                    stop_check("cross-attention k/v")
                    binder = PromptBinder(model, [item.concept])
                    _begin_concept(stats, item, "unet")
                    for target, templates in stats.sets(item.concept, settings):
                        prompts = prompts_for(item.concept, templates)
                        z = binder.encode_to_eos(prompts)  # [P, L, T, D]: nothing after an EOS is used
                        rows = []
                        for p, (prompt, template) in enumerate(zip(prompts, templates)):
                            ids, slots = binder.tokenize_bound(prompt)
                            positions = [pos for pos, _ in slots] + [_eos_position(ids, eos)]
                            if not slots:
                                # trigger words: the words and what follows up to the EOS, as tokens
                                # are. The encoder is causal, so the template's words before them
                                # encode alike for every concept and would only pull the solve toward
                                # the average; the padding after the EOS would outweigh the concepts
                                # whose rows are their tokens and EOS.
                                prefix, _ = binder.tokenize_bound(template.split("{}")[0])
                                positions = list(range(_eos_position(prefix, eos), positions[-1] + 1))
                            rows.append(z[p][:, positions])  # [L, n_pos, D]
                        feats = torch.cat(rows, dim=1)
                        del z
                        for n, st in target.items():
                            x = feats[attn2.index(n.rsplit(".", 1)[0])]
                            st.add(_layer_rows(unet.get_submodule(n), n in stats.biased)(x))
                    _end_concept(stats, spill_dir)
                    if progress:
                        progress(label, k + 1, len(inputs))
                measured += solve_pass("kv", stats, result.unet_weights, result.unet_biases)
                del stats
                allocator.trim()
        finish("kv", measured, t0)

    # ---- the conditionings the UNet stages need, made while the text encoders are here; they wait
    # on disk, and the encoders' memory goes to the UNet
    spatial_conds, check_conds = [], []
    with weights.swapped(te, "text", *fused_te):
        for k, item in enumerate(inputs):
            if do_spatial:
                solve_set = solve_templates(item.concept, settings)
                templates = [solve_set[j % len(solve_set)] for j in range(train)] + extra
                cond = PromptBinder(model, [item.concept]).conditioning(prompts_for(item.concept, templates), size, size)
                spatial_conds.append(_stash(spill_dir, f"spatial{k}", cond))
    if settings.check_steps:
        check_conds = [_stash(spill_dir, f"check{k}", c) for k, c in enumerate(check.conditionings(
            model, inputs, result, size=size, seeds=settings.check_seeds, seed=settings.seed,
            templates=lambda c: solve_templates(c, settings), fused_text=lambda: weights.swapped(te, "text", *fused_te),
            restore=weights.changed))]
    weights.release("text")

    # ---- stage 3: every other UNet layer a concept changes (attention q/out, feed-forward,
    # proj_in/out, resnet convs, ...), recorded while sampling each concept with its own UNet changes:
    # `spatial_seeds` training samples (prompts alternating between the templates), then one
    # validation and one held-out sample (each its own seed and prompt) in one batch; the hooks
    # split the batch rows. Layers whose statistics do not fit the memory budget together are
    # recorded in further sampling passes.
    if do_spatial or check_conds:
        weights.load("unet")
    if do_spatial:
        t0 = time.perf_counter()
        shortfall = spatial_shortfall(model.config, settings)
        if shortfall:
            result.warnings.append(shortfall)
        biased = spatial_biased
        seeds = [settings.seed + j for j in range(train + len(extra))]
        valid = 1 if extra and extra[0] == VALIDATION_TEMPLATES[0] else 0
        budget = memory.stats_budget(budget_gb, "spatial", memory.resident_bytes(unet, te), spatial_work, unet,
                                     spatial_names, biased, budget_option)
        groups = memory.passes(unet, spatial_names, biased, budget)
        fused_kv = (memory.Selected(result.unet_weights, kv_set), memory.Selected(result.unet_biases, kv_set))
        measured = []
        with weights.swapped(unet, "unet", *fused_kv), bounded_self_attention(unet):
            for g, group in enumerate(groups):
                stats = _new_stats(unet, group, device, settings, biased=biased)
                label = "spatial" + (f" (pass {g + 1}/{len(groups)})" if len(groups) > 1 else "")
                for k, item in enumerate(inputs):
                    stop_check("spatial")
                    spatial_only = dataclasses.replace(
                        item.concept, text_lora={},
                        unet_lora={n: f for n, f in item.concept.unet_lora.items() if n not in kv_set})
                    _begin_concept(stats, item, "unet")
                    what = f"{label}: sampling concept {k + 1}/{len(inputs)}"

                    def on_step(step: int, x: torch.Tensor, _what=what) -> None:
                        stop_check("spatial")
                        if progress:
                            progress(_what, step + 1, settings.spatial_steps)

                    if progress:
                        progress(what, 0, settings.spatial_steps)
                    with applied([(spatial_only, item.unet_weight, 0.0)], unet, te, weights.changed), \
                            _recording(unet, stats.solve, biased, select=lambda x: x[:train]), \
                            _recording(unet, stats.valid, biased, select=lambda x: x[train:train + valid]), \
                            _recording(unet, stats.held, biased, select=lambda x: x[train + valid:]):
                        sampling.sample_euler(model, sampling.conditioning_to(_unstash(spatial_conds[k]), device), None,
                                              seeds=seeds, height=size, width=size, steps=settings.spatial_steps,
                                              cfg_scale=1.0, callback=on_step)
                    _end_concept(stats, spill_dir)
                measured += solve_pass("spatial", stats, result.unet_weights, result.unet_biases)
                del stats
                allocator.trim()
        finish("spatial", measured, t0)

    if check_conds:
        t0 = time.perf_counter()

        def on_concept(k: int) -> None:
            stop_check("picture check")
            if progress:
                progress("picture: checking", k, len(inputs))

        with bounded_self_attention(unet):
            errors = check.prediction_errors(
                model, inputs, [_unstash(c) for c in check_conds], size=size, steps=settings.check_steps,
                seeds=settings.check_seeds, cfg=settings.check_cfg, seed=settings.seed,
                fused_unet=lambda: weights.swapped(unet, "unet", result.unet_weights, result.unet_biases),
                on_concept=on_concept, restore=weights.changed)
        if progress:
            progress("picture: checking", len(inputs), len(inputs))
        result.report += [{"concept": i.concept.name, "stage": PICTURE, "layers": 0, **e}
                          for i, e in zip(inputs, errors)]
        result.seconds[PICTURE] = time.perf_counter() - t0
        peak(PICTURE)
    return result
