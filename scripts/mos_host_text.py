"""Host glue: the WebUI's live text encoders addressed by the core's text-layer names, and a region's
text-encoder LoRAs applied while its prompt is encoded.

The core names text layers from its family's text root (`lib_mos.models.family`): SD1's one CLIP
text model, SDXL's "0." (CLIP-L) and "1." (OpenCLIP bigG, in transformers' names, as kohya's
`lora_te2_` keys spell them). The host row (`mos_host.ROW.text_encoders`) says where they live;
in Forge all are transformers models. A1111 v1.10.1 keeps SDXL's bigG as OpenCLIP's text
transformer: there q, k and v are the row blocks of one `attn.in_proj_weight` of a
MultiheadAttention, out is `attn.out_proj` (which the attention reads as a weight, never calls),
and mlp fc1/fc2 are `mlp.c_fc`/`mlp.c_proj`.

`HostTextRoot` resolves a name to the live layer (q/k/v as a Linear whose weight is a view of the
fused rows, for shape checks). `changed` applies changes the way that layer is computed: a forward
hook on a Linear that runs (`RegionDeltas`, no weight written), and for a fused attention the
changed `in_proj`/`out_proj` tensors swapped in by a pre-hook for that attention's own forward and
the originals swapped back by its forward hook (and in `finally`), so at most one layer's copy
exists at a time and the live tensors are the same objects, bit for bit, afterwards. The host's
Lora has applied its networks to these layers when the generation's prompts were encoded, which
happens before the first denoising step where region prompts are encoded, so its lazy re-apply at
a forward sees its own set and leaves the weights as they are.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lib_mos.concepts.concept import layer_change
from lib_mos.files import import_sibling
from lib_mos.models.family import ModelFamily
from lib_mos.regional.loras import RegionDeltas, RegionLora

mos_host = import_sibling(__file__, "mos_host")

_TE2_FUSED = re.compile(r"1\.text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj")
_TE2_MLP = re.compile(r"1\.text_model\.encoder\.layers\.(\d+)\.mlp\.fc([12])")
_FUSED_ROWS = {"q": 0, "k": 1, "v": 2}


class _Rows(nn.Linear):
    """q, k or v of a fused attention as a Linear whose weight (and bias) view the fused rows; only
    for reading shapes, never called."""

    def __init__(self, attention: nn.MultiheadAttention, index: int) -> None:
        nn.Module.__init__(self)
        d = attention.embed_dim
        self.in_features = self.out_features = d
        self.weight = nn.Parameter(attention.in_proj_weight.detach()[index * d:(index + 1) * d], requires_grad=False)
        bias = attention.in_proj_bias
        self.bias = None if bias is None else nn.Parameter(bias.detach()[index * d:(index + 1) * d],
                                                          requires_grad=False)


class HostTextRoot(nn.Module):
    """The live model's text encoders under the core's names (see the module docstring)."""

    def __init__(self, sd_model, family: ModelFamily) -> None:
        super().__init__()
        self.family = family
        self._encoders, self._te2 = mos_host.ROW.text_encoders(sd_model, family)

    def get_submodule(self, target: str) -> nn.Module:
        if self._te2 is not None and target.startswith("1."):
            if m := _TE2_FUSED.fullmatch(target):
                attention = self._te2.transformer.resblocks[int(m[1])].attn
                return attention.out_proj if m[2] == "out" else _Rows(attention, _FUSED_ROWS[m[2]])
            if m := _TE2_MLP.fullmatch(target):
                mlp = self._te2.transformer.resblocks[int(m[1])].mlp
                return mlp.c_fc if m[2] == "1" else mlp.c_proj
            raise AttributeError(f"no text layer {target!r} in the live OpenCLIP encoder")
        for root, encoder in self._encoders.items():
            if target.startswith(root):
                return encoder.get_submodule(target[len(root):])
        raise AttributeError(f"no text layer {target!r} in the live text encoders")

    def _fused(self, name: str) -> tuple[nn.MultiheadAttention, str] | None:
        """(the attention, "q" | "k" | "v" | "out") for a layer that is part of a fused attention."""
        m = _TE2_FUSED.fullmatch(name) if self._te2 is not None else None
        return None if m is None else (self._te2.transformer.resblocks[int(m[1])].attn, m[2])

    @contextmanager
    def changed(self, loras: Sequence[RegionLora]) -> Iterator[None]:
        """The text-encoder changes of `loras` (each at its weight) applied to every prompt encoded
        inside the block; every hook is removed and every tensor put back in `finally`."""
        plain: list[RegionLora] = []
        fused: dict[nn.MultiheadAttention, dict[str, torch.Tensor]] = {}
        for lora in loras:
            kept = {}
            for name, delta in lora.concept.text_lora.items():
                found = self._fused(name)
                if found is None:
                    kept[name] = delta
                    continue
                attention, which = found
                weight = attention.out_proj.weight if which == "out" else self.get_submodule(name).weight
                change = layer_change(delta, weight).to(weight.dtype) * lora.weight
                parts = fused.setdefault(attention, {})
                parts[which] = parts[which] + change if which in parts else change
                # as the host's Lora: of a fused attention's changes only out's bias change is applied
                # (it keeps q/k/v's updown and drops their bias: `updown_q, _ = module_q.calc_updown(qw)`)
                bias = delta.bias_delta() if which == "out" else None
                if bias is not None:
                    key = which + ".bias"
                    bias = bias.to(weight.device, weight.dtype) * lora.weight
                    parts[key] = parts[key] + bias if key in parts else bias
            plain.append(RegionLora(0, dataclasses.replace(lora.concept, text_lora=kept), lora.weight, lora.name))
        deltas = RegionDeltas(self, plain, 1, masked=False, text=True)
        handles, swapped = [], {}

        def swap_in(attention, args, _parts=None):
            parts = fused[attention]
            saved = swapped[attention] = {}
            d = attention.embed_dim
            in_w = attention.in_proj_weight
            if any(p in parts for p in _FUSED_ROWS):
                saved["in_proj_weight"] = in_w.data
                changed = in_w.data.clone()
                for which, index in _FUSED_ROWS.items():
                    if which in parts:
                        changed[index * d:(index + 1) * d] += parts[which]
                in_w.data = changed
            if "out" in parts:
                saved["out_proj.weight"] = attention.out_proj.weight.data
                attention.out_proj.weight.data = attention.out_proj.weight.data + parts["out"]
            if "out.bias" in parts and attention.out_proj.bias is not None:
                saved["out_proj.bias"] = attention.out_proj.bias.data
                attention.out_proj.bias.data = attention.out_proj.bias.data + parts["out.bias"]

        def swap_back(attention, *_):
            for path, data in swapped.pop(attention, {}).items():
                attention.get_parameter(path).data = data

        try:
            for attention in fused:
                handles.append(attention.register_forward_pre_hook(swap_in))
                handles.append(attention.register_forward_hook(swap_back))
            with deltas.installed():
                yield
        finally:
            for handle in handles:
                handle.remove()
            for attention in list(swapped):
                swap_back(attention)
