"""The fusion's memory budget bounds the whole process, not only the statistics.

A fusion holds, at any time: the interpreter and libraries (`BASELINE_BYTES`), the model parts the
stage needs (the text encoders for the te and k/v stages; the UNet for the spatial stage and the
picture check; `Weights` loads and releases them), the activations of one batch, and the layers'
statistics. Every stage therefore records its layers in as many passes as it takes for the
statistics to fit what is left of the budget (`passes`); a budget too small for the model and one
layer is refused before any work, naming the smallest that would do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from lib_mos.concepts.concept import ConceptError, kept_aside
from lib_mos.models.family import ModelFamily

GIB = 2**30
# Python, torch, transformers and the tokenizer (0.28 GiB measured after the imports), plus
# allocator slack
BASELINE_BYTES = int(0.6 * GIB)


class Weights(Protocol):
    """Where the model's weights come from: `load` makes a part (or some of its modules) hold real
    weights, `release` gives a part's memory back (the fusion needs it no more), `swapped` puts
    other weights into a part's layers for the duration of a block, `changed` lets a block change
    the named layers in place and gets them back afterwards (`concept.applied`'s `restore`)."""

    def load(self, part: str, names: Sequence[str] | None = None) -> None: ...

    def release(self, part: str) -> None: ...

    def swapped(self, root: nn.Module, part: str, weights: Mapping[str, torch.Tensor],
                biases: Mapping[str, torch.Tensor]) -> contextlib.AbstractContextManager: ...

    def changed(self, root: nn.Module, part: str, names: Sequence[str]) -> contextlib.AbstractContextManager: ...


class Resident:
    """A model whose weights are all in memory already (tests, in-process callers): a swap keeps
    the original tensors aside and puts them back."""

    def load(self, part: str, names: Sequence[str] | None = None) -> None:
        pass

    def release(self, part: str) -> None:
        pass

    def swapped(self, root: nn.Module, part: str, weights: Mapping[str, torch.Tensor],
                biases: Mapping[str, torch.Tensor]) -> contextlib.AbstractContextManager:
        from lib_mos.fusion.pipeline import _weights

        return _weights(root, weights, biases)

    def changed(self, root: nn.Module, part: str, names: Sequence[str]) -> contextlib.AbstractContextManager:
        return kept_aside(root, part, names)


class DiskTensors(MutableMapping[str, torch.Tensor]):
    """A dict of tensors kept in files of `folder` and read on access: the fused weights of a
    whole SDXL UNet are 4 GB in float32, which would not leave the model room beside them."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, tuple[Path, tuple[int, ...]]] = {}

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        from lib_mos.tensorfile import write_entries

        value = value.detach().cpu().contiguous()
        path = self._files[key][0] if key in self._files else self.folder / f"{len(self._files)}.safetensors"
        with open(path, "wb") as f:
            write_entries(f, path, [("t", value.dtype, tuple(value.shape), value)])
        self._files[key] = (path, tuple(value.shape))

    def __getitem__(self, key: str) -> torch.Tensor:
        from lib_mos.tensorfile import TensorFile

        with TensorFile(self._files[key][0]) as f:
            return f.read("t")

    def __delitem__(self, key: str) -> None:
        path, _ = self._files.pop(key)
        path.unlink(missing_ok=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def shape_of(self, key: str) -> tuple[int, ...]:
        """The tensor's shape without reading it."""
        return self._files[key][1]


class Selected(Mapping[str, torch.Tensor]):
    """The entries of `table` named in `names`, each read only when asked for: a view of a
    `DiskTensors` keeps its values on disk (SDXL's 140 fused k/v weights are 1.3 GB in float32,
    which a dict of them held through the whole spatial stage)."""

    def __init__(self, table: Mapping[str, torch.Tensor], names: Iterable[str]) -> None:
        self.table = table
        wanted = set(names)
        self._names = [n for n in table if n in wanted]
        self._wanted = set(self._names)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._wanted:
            raise KeyError(key)
        return self.table[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (Linux's VmHWM), in MiB; None elsewhere. (Never
    reset: the kernel's figure is what a parent's getrusage and every outside measure read.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def resident_bytes(*modules: nn.Module, planned: bool = False) -> int:
    """Bytes of real (not meta) parameters and buffers the modules hold. `planned`: those not loaded
    yet (meta) too, at their dtype: what a stage that loads them holds at least."""
    seen: set[tuple[bool, int]] = set()
    total = 0
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            meta = t.device.type == "meta"
            key = (meta, id(t) if meta else t.data_ptr())  # a meta tensor has no storage to tell shares by
            if (planned or not meta) and key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def layer_stats_bytes(width: int, out: int, dense: bool = True) -> int:
    """Statistics one layer holds while the concepts stream past: the open concept's Gram (float64)
    and the validation and held-out ones (float32), the concept's change (float64), W0 and the sum
    of changes (float32). The per-concept factors go to disk; a concept's factor when it ends and
    the solve are transient, one layer at a time (`transient_bytes`). `dense=False` (the k/v
    stage: a few raw rows per concept, never a Gram): the changes and W0 only."""
    return 16 * width * width * dense + 16 * out * width


def transient_bytes(width: int, out: int) -> int:
    """The most one layer needs beyond its statistics while a concept ends (its Gram's float64
    factor) or the layer is solved (G assembled and its Cholesky factor, float64, and the
    right-hand sides)."""
    return 16 * width * width + 16 * out * width


def _level(name: str, levels: int) -> int:
    """The UNet level (number of halvings) whose feature map a layer of `name` takes as input, in
    ldm's block names (the sampler's first conv of a level sits in the level above; an output
    block's upsampler is counted at its block's level: at most 4x too many cells)."""
    parts = name.split(".")
    if parts[0] == "input_blocks":
        return min(max(int(parts[1]) - 1, 0) // 3, levels - 1)
    if parts[0] == "output_blocks":
        return max(levels - 1 - int(parts[1]) // 3, 0)
    if parts[0] == "middle_block":
        return levels - 1
    return 0  # conv_in, out: the latent's size; time and label embeddings see one row per sample


def unet_activation_bytes(family: ModelFamily, model_channels: int, size: int, batch: int, dtype: torch.dtype,
                          recorded: Sequence[tuple[str, int]]) -> int:
    """An upper estimate of one UNet call's activations on a `batch` of `size` px pictures: the
    skip connections, a resblock's working copies of the largest feature map, attention scores in
    `attend`'s bounded slices, and the float64 copy of the largest recorded input (`recorded`:
    (layer name, input width as the solve sees it, a conv's patches unfolded))."""
    from lib_mos.models.attention import SCORES_BYTES

    elt = torch.finfo(dtype).bits // 8
    levels = family.level_sizes(size, size)
    maps = [model_channels * mult * h * w for mult, (h, w) in zip(family.channel_mult, levels)]
    cells = [h * w for h, w in levels]
    rows = max((8 * batch * cells[_level(n, len(levels))] * width for n, width in recorded), default=0)
    return batch * (3 * sum(maps) + 10 * max(maps)) * elt + SCORES_BYTES + rows


def text_activation_bytes(width: int, layers: int, batch: int, tokens: int = 77) -> int:
    """One batch of layer copies through a text encoder that keeps every hidden state (SDXL's
    penultimate-layer output), in float32 at worst, with its MLP's working copy."""
    return 4 * batch * tokens * width * (layers + 1 + 8)


def _shape(root: nn.Module, name: str, biased: frozenset[str]) -> tuple[int, int]:
    """(input width as the solve sees it, output width) of a layer: a conv's patches, a bias column."""
    weight = root.get_submodule(name).weight
    return weight[0].numel() + (name in biased), weight.shape[0]


def passes(root: nn.Module, names: Sequence[str], biased: frozenset[str], budget: int, dense: bool = True,
           ) -> list[list[str]]:
    """The layers split into recording passes whose statistics fit `budget` bytes together (a
    layer larger than the budget gets a pass of its own; `stats_budget` refuses that case first):
    memory is bounded per layer, not by the number of layers a LoRA changes."""
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        need = layer_stats_bytes(*_shape(root, name, biased), dense)
        if groups[-1] and used + need > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += need
    return [g for g in groups if g]


def stats_budget(budget_gb: float, stage: str, held: int, activations: int, root: nn.Module,
                 names: Sequence[str], biased: frozenset[str], where: str, dense: bool = True) -> int:
    """Bytes left for a stage's statistics under `budget_gb` beside the baseline (host memory
    only), the model parts it holds and one batch's activations, keeping room for the largest
    layer's transient work; a budget too small for even one layer is an error naming the smallest
    budget that would do. `where`: "--memory-gb" or "--vram-gb"."""
    host = where == "--memory-gb"
    fixed = BASELINE_BYTES * host + held + activations
    shapes = {n: _shape(root, n, biased) for n in names}
    transient = max((transient_bytes(*s) for s in shapes.values()), default=0)
    name, one = max(((n, layer_stats_bytes(*s, dense)) for n, s in shapes.items()), key=lambda t: t[1],
                    default=("", 0))
    left = int(budget_gb * GIB) - fixed - transient
    if left < one:
        need = (fixed + transient + one) / GIB
        raise ConceptError(
            f"{where} {budget_gb:g} is too small for the {stage} stage: the model parts it needs take "
            f"{held / GIB:.1f} GiB, one batch's work {activations / GIB:.1f} GiB"
            + (f", the process itself {BASELINE_BYTES / GIB:.1f} GiB" if host else "")
            + f", and layer {name} needs {(one + transient) / GIB:.2f} GiB; use at least {need + 0.05:.1f}")
    return left
