"""A checkpoint's parts in memory only while they are needed (`fusion.memory.Weights`).

A fusion needs the text encoders for its first stages and the UNet for its last; holding both,
SDXL is 6.9 GB in half precision, most of an 8 GB budget. `CheckpointWeights` gives a part's
memory back (its tensors go to the meta device) and reads it again from the file, tensor by
tensor, when a stage asks for it: whole, or only some of its modules (the k/v stage needs 140 of
the UNet's linears, not its 2.6 billion parameters).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from lib_mos.models.family import SD1, SDXL
from lib_mos.models.sd1 import SD1Model
from lib_mos.models.sdxl import SDXLModel


def _file_key(model: SD1Model | SDXLModel, part: str, name: str, canon: dict[str, str]) -> tuple[str, int | None]:
    """(the file's key, which third of a stacked q/k/v tensor or None) of a parameter or buffer
    `name` of `part` ("text": rooted at the model's text root; "unet")."""
    from lib_mos.models import sd1, sdxl

    family = model.family
    if part == "unet":
        return canon[family.unet_prefix + name], None
    if family is SD1:
        return canon[sd1.TEXT_PREFIX + name], None
    index, rest = name.split(".", 1)
    if index == "0":
        return canon[sdxl.TE1_PREFIX + rest], None
    key, third = sdxl.te2_file_key(rest)
    return canon[sdxl.TE2_PREFIX + key], third


class CheckpointWeights:
    """`fusion.memory.Weights` for a model loaded from `path` with `checkpoints.load_checkpoint`."""

    def __init__(self, path: str | os.PathLike[str], model: SD1Model | SDXLModel) -> None:
        from lib_mos.models import sd1
        from lib_mos.tensorfile import TensorFile

        self.path = Path(path)
        self.model = model
        self.device = next(model.text_root.parameters()).device  # the UNet may still be on meta
        with TensorFile(self.path) as f:
            keys = list(f)
        # SD1 files may hold legacy text keys (the loader's renaming); SDXL's are as written
        self._canon = {sd1._canonical_key(k) if model.family is SD1 else k: k for k in keys}

    def _root(self, part: str) -> nn.Module:
        if part not in ("text", "unet"):
            raise ValueError(f"unknown model part {part!r}")
        return self.model.text_root if part == "text" else self.model.unet

    def release(self, part: str, names: Sequence[str] | None = None) -> None:
        """Give the part's (or the named modules') memory back: their tensors move to the meta
        device (shapes kept), and the allocator returns their pages to the system."""
        from lib_mos import allocator

        root = self._root(part)
        for module in [root.get_submodule(n) for n in names] if names is not None else [root]:
            module.to("meta")
        allocator.trim()

    @contextlib.contextmanager
    def changed(self, root: nn.Module, part: str, names: Sequence[str]) -> Iterator[None]:
        """The named layers may be changed in place within the block (no second copy of them);
        afterwards they are read from the file again, so they must hold the file's weights when
        the block begins (a layer inside `swapped` is not one to change)."""
        try:
            yield
        finally:
            self.release(part, names)
            self.load(part, names)

    @contextlib.contextmanager
    def swapped(self, root: nn.Module, part: str, weights: Mapping[str, torch.Tensor],
                biases: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Other weights in the part's layers, written in place one at a time."""
        with self.changed(root, part, sorted(set(weights) | set(biases))):
            with torch.no_grad():
                for table, attr in ((weights, "weight"), (biases, "bias")):
                    for name in table:
                        target = getattr(root.get_submodule(name), attr)
                        target.copy_(table[name].reshape(target.shape))
            yield

    @torch.no_grad()
    def load(self, part: str, names: Sequence[str] | None = None) -> None:
        """Make the part (or only the named modules of it) hold the file's weights again; tensors
        that are real already are left alone."""
        from lib_mos.tensorfile import TensorFile

        root = self._root(part)
        modules = [(n, root.get_submodule(n)) for n in names] if names is not None else [("", root)]
        targets: dict[str, torch.Tensor] = {}
        for prefix, module in modules:
            if any(t.device.type == "meta" for t in (*module.parameters(), *module.buffers())):
                module.to_empty(device=self.device)  # reallocates every tensor of it: read them all
                targets |= {f"{prefix}.{n}" if prefix else n: t for n, t in module.state_dict(keep_vars=True).items()}
        if not targets:
            return
        with TensorFile(self.path) as f:
            stacked: dict[str, torch.Tensor] = {}
            for full, target in targets.items():
                if full.endswith("position_ids"):
                    target.copy_(torch.arange(target.shape[-1], device=self.device).expand_as(target))
                    continue
                key, third = _file_key(self.model, part, full, self._canon)
                if third is not None:
                    if key not in stacked:
                        stacked = {key: f.read(key)}  # q, k and v of one layer come together
                    target.copy_(stacked[key].chunk(3)[third])
                elif self.model.family is SDXL and part == "text" and full.endswith("text_projection.weight"):
                    target.copy_(f.read(key).t())
                else:
                    f.read_into(key, target)
