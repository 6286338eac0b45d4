"""Region LoRAs: unfused LoRAs applied only inside their regions, all in one UNet pass.

For every UNet module a region LoRA changes, a forward hook adds

    sum_r w_r(position) * weight_r * delta_r(x)

to the module's output, with w_r the blend weights the regional attention gives region r at that
output's resolution (`attention.region_blend_weights` of the same masks: 1 inside the region, 0
outside, shared on overlaps, soft along feathered edges; the global prompt's share inside regions
does not dilute a region's LoRA). The cross-attention `to_k`/`to_v` of attn2 see no positions:
there region r's change is applied to region r's own context only (`RegionDeltas.context_delta`,
called by `attention.regional_attention`), and the global context gets the base projection,
except for the share of it a region keeps inside it (`global_weight`), which is projected with
that region's change (`attention.global_keys_values`).

A ResBlock's time-embedding projection (`emb_layers.1`) has no positions either: its output is
added to every position of the block's feature map, so the hook keeps each region's change and a
pre-hook on the block's `out_layers` adds it where the region is. A change of the time embedding
itself (`time_embed`) gives each region its own embedding [B, K, C]; every ResBlock then projects
each region's embedding (with that region's own projection change) and adds the difference to the
base projection where the region is: inside a region, each block sees what the UNet with only that
region's LoRA gives it. SDXL's vector input `y` goes the same way when region LoRAs change the
text encoder it is pooled from (`vectors=True`): `vector_changes(rows)` gives each row's change of
`y` per region for the UNet call that starts, and region k's embedding is the vector MLP of its
own `y`.

How each change is computed: plain LoRAs (linear, LoCon conv without a Tucker core, no DoRA) and
LoHa without Tucker cores (as a rank r1*r2 LoRA, `_low_rank`) stay low-rank, all regions'
down-projections in one matmul (or conv), the mask weights applied on the rank columns, then one
up-projection; every other kind (LoKr, full diffs, DoRA, Tucker cores) is
built once per generation by the host's formula, every factor in float32 (`ModuleDelta.weight_delta`
with `upcast`; the host multiplies fp16/bf16 LyCORIS factors in their own dtype), and applied as one
matmul per region. Nothing changes a weight: the hooks live on module instances and are removed in
`finally` (`installed`), so the model is untouched by construction and the host's own Lora, which
changes weights, keeps working alongside.

The same class with `masked=False` adds the changes everywhere: the text encoder while a region's
prompt is encoded with its LoRAs.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lib_mos.concepts.concept import Concept, ConceptError, Delta, LoraFactor, layer_kind
from lib_mos.prompt_tags import extra_network_tags
from lib_mos.regional.attention import region_blend_weights
from lib_mos.regional.regions import RegionError, RegionSpec

__all__ = ["RegionDeltas", "RegionLora", "RegionLoraChoice", "choose_region_loras", "global_lora_names",
           "text_loras_of"]

_ATTN2_KV = re.compile(r"(^|\.)attn2\.to_[kv]$")
_EMB = ".emb_layers.1"
# The UNet's embedding MLPs (Linear, SiLU, Linear), summed into the embedding every ResBlock
# projects: the time embedding, and SDXL's pooled/size vector (`label_emb`).
_EMBED_MLPS = ("time_embed", "label_emb.0")
_VECTOR_MLP = _EMBED_MLPS[1]
_TIME_LINEARS = tuple(f"{mlp}.{i}" for mlp in _EMBED_MLPS for i in (0, 2))
_NOT_LOW_RANK = {"lora_mid.weight", "dora_scale", "bias"}


@dataclass(frozen=True)
class RegionLora:
    """One LoRA applied inside one region (index into the spec's regions) at `weight`."""

    region: int
    concept: Concept
    weight: float = 1.0
    name: str = ""


@dataclass(frozen=True)
class RegionLoraChoice:
    """Which file a region uses, at what weight, and why (for the infotext)."""

    region: int
    name: str
    path: Path
    weight: float
    source: str  # "listed", or "token <x1>" when a concept token in the region's prompt brought it


def text_loras_of(loras: Sequence[RegionLora], region: int) -> list[RegionLora]:
    """The LoRAs that change region `region`'s text encoding, as one set applied everywhere while
    that region's texts are encoded (`RegionDeltas(..., masked=False, text=True)`: region 0)."""
    return [RegionLora(0, lora.concept, lora.weight, lora.name) for lora in loras
            if lora.region == region and lora.weight and lora.concept.text_lora]


def global_lora_names(prompts: Sequence[str]) -> set[str]:
    """Names of the LoRAs the host applies to the whole image (`<lora:name...>` in the main prompts),
    stripped of spaces as region LoRA names are (`LoraRef.checked`); a tag without a name names nothing."""
    return {name for text in prompts for tag in extra_network_tags(str(text))
            if tag.is_lora and (name := tag.args[0].strip())}


def choose_region_loras(spec: RegionSpec, available: Mapping[str, Path], folder: str,
                        region_token_files: Sequence[Mapping[str, Path]], global_names: set[str],
                        ) -> list[RegionLoraChoice]:
    """The LoRAs each region applies, by these rules (docs/regions.md states them):

    - a region's `loras` and the `<lora:name:w>` tags in its prompt, by name in the Lora folder;
      a name that is not there, or that the main prompt already applies to the whole image, is a
      RegionError (one LoRA is never applied twice);
    - a concept token of a concept *file* in a region's prompt (`region_token_files[i]`: token ->
      file) brings that file's LoRA at weight 1, unless the region lists it already or the main
      prompt applies it (a concept fused into the checkpoint has no file here: nothing to add).
    """
    chosen: list[RegionLoraChoice] = []
    for i, region in enumerate(spec.regions):
        paths: set[Path] = set()
        for ref in region.lora_refs(i):
            path = available.get(ref.name)
            if path is None:
                close = difflib.get_close_matches(ref.name, list(available), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise RegionError(f"region {i}: field 'loras': no LoRA named {ref.name!r} in {folder}{hint}")
            if ref.name in global_names:
                raise RegionError(f"region {i}: field 'loras': LoRA {ref.name!r} is already applied to the whole "
                                  f"image by <lora:{ref.name}> in the main prompt; remove one of the two")
            chosen.append(RegionLoraChoice(i, ref.name, path, ref.weight, "listed"))
            paths.add(path)
        for token, path in region_token_files[i].items() if i < len(region_token_files) else ():
            if path in paths or path.stem in global_names:
                continue
            chosen.append(RegionLoraChoice(i, path.stem, path, 1.0, f"token {token}"))
            paths.add(path)
    return chosen


def _low_rank(delta: Delta) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(down [R, in(, kh, kw)], up [out, R] with the scale folded in) for a plain LoRA or a LoHa
    without Tucker cores, else None.

    A LoHa's change (A1 B1) * (A2 B2) (elementwise) has rank at most r1 r2: it is U V with
    U[:, (i, j)] = A1[:, i] * A2[:, j] and V[(i, j), :] = B1[i, :] * B2[j, :], so a rank-4 LoHa is
    applied as a rank-16 LoRA instead of a dense matrix."""
    if isinstance(delta, LoraFactor):
        return delta.down.float(), delta.up.float() * delta.scale
    parts = delta.parts
    if _NOT_LOW_RANK & set(parts):
        return None
    if delta.kind == "lora":
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        return down, up.reshape(up.shape[0], -1) * delta.scale
    if delta.kind == "loha" and not {"hada_t1", "hada_t2"} & set(parts):
        a1, b1, a2, b2 = (parts[k].float() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        b1, b2 = b1.reshape(b1.shape[0], -1), b2.reshape(b2.shape[0], -1)
        up = (a1.reshape(a1.shape[0], -1, 1) * a2.reshape(a2.shape[0], 1, -1)).reshape(a1.shape[0], -1)
        down = (b1.unsqueeze(1) * b2.unsqueeze(0)).reshape(-1, b1.shape[1])
        return down, up * delta.scale
    return None


class _Plan:
    """Every region change of one module: low-rank columns (one region each) and dense changes."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module
        self.is_conv = layer_kind(module) == "conv"
        self.downs: list[torch.Tensor] = []
        self.ups: list[torch.Tensor] = []
        self.cols: list[int] = []
        self.dense: list[tuple[int, Delta, float]] = []
        self.biases: list[tuple[int, torch.Tensor]] = []
        self._cast: dict[tuple, tuple] = {}
        self._selectors: dict[tuple, torch.Tensor] = {}

    @property
    def cols_key(self) -> tuple[int, ...]:
        """Which region each low-rank column belongs to (modules with equal keys share mask weights)."""
        return tuple(self.cols)

    def add(self, region: int, delta: Delta, weight: float) -> None:
        factors = _low_rank(delta)
        if factors is not None:
            down, up = factors
            if self.is_conv and down.dim() == 2:  # [R, in * kh * kw] (or a linear-shaped LoRA on a 1x1 conv)
                down = down.reshape(down.shape[0], *self.module.weight.shape[1:])
            self.downs.append(down)
            self.ups.append(up * weight)
            self.cols += [region] * down.shape[0]
        else:
            self.dense.append((region, delta, weight))
        bias = delta.bias_delta()
        if bias is not None:
            self.biases.append((region, bias.float() * weight))

    def tensors(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """(down, up, cols, [(region, dense change)], [(region, bias)]) in the call's dtype and device;
        dense changes built once, as the host builds them, from the module's weight."""
        key = (dtype, device)
        if key not in self._cast:
            down = up = cols = None
            if self.downs:
                down = torch.cat(self.downs).to(device, dtype)
                up = torch.cat(self.ups, dim=1).to(device, dtype)
                cols = torch.tensor(self.cols, device=device)
            weight = self.module.weight
            base = weight.detach().float()
            dense = [(r, d.weight_delta(base, torch.float32, upcast=True).reshape(weight.shape).to(device, dtype) * w)
                     for r, d, w in self.dense]
            biases = [(r, b.to(device, dtype)) for r, b in self.biases]
            self._cast[key] = (down, up, cols, dense, biases)
        return self._cast[key]

    def selector(self, regions: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[regions, R]: 1 where low-rank column j belongs to region k, else 0 (plans with low-rank
        columns only). Kept on the plan, which it belongs to: every hooked call asks for the same one."""
        key = (regions, dtype, device)
        if key not in self._selectors:
            cols = self.tensors(dtype, device)[2]
            self._selectors[key] = (cols.unsqueeze(0) == torch.arange(regions, device=cols.device).unsqueeze(1)).to(dtype)
        return self._selectors[key]


class RegionDeltas:
    """Forward hooks adding region LoRAs' changes to the modules of `root` (a UNet, or with
    `masked=False` a text encoder). `set_masks` gives the masks at every level before each UNet call."""

    def __init__(self, root: nn.Module, loras: Sequence[RegionLora], regions: int, *, masked: bool = True,
                 text: bool = False, vectors: bool = False) -> None:
        self.root, self.regions, self.masked = root, regions, masked
        self.vectors = vectors and masked
        # called at the start of every UNet call with its row count: [rows, K, V] changes of the
        # vector input `y` per region, or None (the caller knows which rows the call takes)
        self.vector_changes: Callable[[int], torch.Tensor | None] | None = None
        self.plans: dict[str, _Plan] = {}
        for lora in loras:
            if lora.weight == 0:  # exactly no change: nothing hooked for it
                continue
            if not 0 <= lora.region < regions:
                raise ValueError(f"region LoRA {lora.name!r}: region {lora.region} of {regions}")
            what = lora.concept.source_path or lora.name or lora.concept.name
            for name, delta in (lora.concept.text_lora if text else lora.concept.unet_lora).items():
                if masked and name.startswith(("time_embed.", "label_emb.")) and name not in _TIME_LINEARS:
                    raise ConceptError(f"{what}: {name} is not a layer of the UNet's embedding MLPs")
                if name not in self.plans:
                    self.plans[name] = _Plan(name, root.get_submodule(name))
                self.plans[name].add(lora.region, delta, lora.weight)
        self.time = {n: self.plans.pop(n) for n in _TIME_LINEARS if n in self.plans} if masked else {}
        if self.time or self.vectors:  # every ResBlock must project each region's own embedding
            for name, module in root.named_modules():
                if hasattr(module, "emb_layers") and hasattr(module, "out_layers"):
                    self.plans.setdefault(name + _EMB, _Plan(name + _EMB, module.emb_layers[1]))
        self._by_module = {id(p.module): p for p in self.plans.values()}
        self._emb_parts: dict[str, torch.Tensor] = {}  # this UNet call's per-region MLP outputs [B, K, C]
        self._weights: dict[tuple[int, int], torch.Tensor] = {}
        self._levels: dict[int, tuple[int, int]] = {}
        self._masks: Mapping[tuple[int, int], torch.Tensor] | None = None
        self._cache: dict[tuple, torch.Tensor] = {}
        self._stash: dict[int, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.plans or self.time or self.vectors)

    # ------------------------------------------------------------------------------ positions
    def set_masks(self, masks: Mapping[tuple[int, int], torch.Tensor]) -> None:
        """Region masks at every level of the UNet, (h, w) -> [K, h*w] (`regions.level_masks` for
        this call's image size); the hooks use their blend weights at every resolution: the levels,
        and an upsampler's output before the host crops it (its level doubled)."""
        if masks is self._masks:
            return
        self._masks = masks
        self._weights = {size: region_blend_weights(m.reshape(1, *m.shape[-2:]))[1][0] for size, m in masks.items()}
        self._cache = {}
        self._levels = {h * w: (h, w) for h, w in self._weights}

    def _region_weights(self, size: tuple[int, int], plan: _Plan) -> torch.Tensor:
        w = self._weights.get(size)
        if w is None:
            h, w_ = size
            level = self._weights.get((h // 2, w_ // 2)) if h % 2 == 0 and w_ % 2 == 0 else None
            if level is None:
                raise RuntimeError(f"region LoRAs: {plan.name} has a {h}x{w_} output, which is no resolution of this "
                                   f"generation's UNet ({sorted(self._weights)}); set_masks() for this size")
            k = level.shape[0]  # an upsampler's output: each cell of the level it doubled, nearest
            w = level.reshape(k, h // 2, 1, w_ // 2, 1).expand(k, h // 2, 2, w_ // 2, 2).reshape(k, h * w_)
            self._weights[size] = w
        return w

    def _position_weights(self, size: tuple[int, int] | int, plan: _Plan, like: torch.Tensor,
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([K, n] region weights, [n, R] weights of the plan's low-rank columns) for an output of
        size (h, w), or of n positions of a transformer (always a level)."""
        key = (size, plan.cols_key, like.dtype, like.device)
        if key not in self._cache:
            if isinstance(size, int):
                if size not in self._levels:
                    raise RuntimeError(f"region LoRAs: {plan.name} has an output of {size} positions, which is no "
                                       f"resolution of this generation's UNet; set_masks() for this size")
                size = self._levels[size]
            w = self._region_weights(size, plan).to(like.device, like.dtype)
            cols = plan.tensors(like.dtype, like.device)[2]
            self._cache[key] = (w, None if cols is None else w.index_select(0, cols).T.contiguous())
        return self._cache[key]

    # ---------------------------------------------------------------------------------- hooks
    def _linear(self, plan: _Plan, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        down, up, _, dense, biases = plan.tensors(out.dtype, out.device)
        w = wcol = None
        if self.masked:
            w, wcol = self._position_weights(out.shape[-2], plan, out)
        x = x.to(out.dtype)
        if down is not None:
            h = F.linear(x, down)
            if wcol is not None:
                h.mul_(wcol)
            if out.requires_grad or not out.is_contiguous():
                out = out + F.linear(h, up)
            else:  # inference: accumulate into the layer's fresh output, no full-size temporary
                out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.t())
        for r, change in dense:
            d = F.linear(x, change)
            out = out + (d if w is None else d * w[r].unsqueeze(-1))
        for r, b in biases:
            out = out + (b if w is None else w[r].unsqueeze(-1) * b)
        return out

    def _conv(self, plan: _Plan, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        m = plan.module
        down, up, _, dense, biases = plan.tensors(out.dtype, out.device)
        hh, ww = out.shape[-2:]
        w = wcol = None
        if self.masked:
            w, wcol = self._position_weights((hh, ww), plan, out)
        x = x.to(out.dtype)
        if down is not None:
            h = F.conv2d(x, down, None, m.stride, m.padding, m.dilation)
            if wcol is not None:
                h.mul_(wcol.T.reshape(1, -1, hh, ww))
            ups = up.expand(h.shape[0], -1, -1)
            if out.requires_grad or not out.is_contiguous():
                out = out + torch.bmm(ups, h.flatten(2)).view_as(out)
            else:
                out.view(*out.shape[:2], -1).baddbmm_(ups, h.flatten(2))
        for r, change in dense:
            d = F.conv2d(x, change, None, m.stride, m.padding, m.dilation, m.groups)
            out = out + (d if w is None else d * w[r].reshape(1, 1, hh, ww))
        for r, bias in biases:
            bias = bias.reshape(1, -1, 1, 1)
            out = out + (bias if w is None else w[r].reshape(1, 1, hh, ww) * bias)
        return out

    def _per_region(self, plan: _Plan, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """[..., K, out]: each region's change of a linear applied to the same input x [..., in]
        (`_each_region` of that one input for all K regions; zeros where the plan changes nothing)."""
        x = x.to(like.dtype)
        shape = (*x.shape[:-1], self.regions, like.shape[-1])
        d = self._each_region(plan, x.reshape(-1, 1, x.shape[-1]), self.regions)
        return like.new_zeros(shape) if d is None else d.reshape(shape)

    def _each_region(self, plan: _Plan, x: torch.Tensor, regions: int | None = None) -> torch.Tensor | None:
        """[B, K, ..., out]: region k's change applied to region k's own input x [B, K, ..., in], or,
        with `regions` = K, to the one input x [B, 1, ..., in] they share (the low-rank down
        projection is then computed once, not K times); None when the plan changes nothing."""
        down, up, _, dense, biases = plan.tensors(x.dtype, x.device)
        k = x.shape[1] if regions is None else regions
        out = None
        if down is not None:
            h = F.linear(x, down)
            out = F.linear(h * plan.selector(k, x.dtype, x.device).reshape(1, k, *[1] * (h.dim() - 3), -1), up)
        if dense or biases:
            out = out if out is not None else x.new_zeros(x.shape[0], k, *x.shape[2:-1], plan.module.out_features)
            for r, change in dense:
                if r < k:
                    out[:, r] += F.linear(x[:, r if x.shape[1] > 1 else 0], change)
            for r, bias in biases:
                if r < k:
                    out[:, r] += bias
        return out

    def context_delta(self, projection: nn.Module, region_context: torch.Tensor) -> torch.Tensor | None:
        """attn2 to_k / to_v: [B, K, T, out], region k's change applied to region k's context
        [B, K, T, D]; None when no region LoRA changes this projection."""
        plan = self._by_module.get(id(projection))
        return None if plan is None else self._each_region(plan, region_context)

    def _region_mlp(self, mlp: nn.Module, prefix: str, x: torch.Tensor, base: torch.Tensor,
                    change: torch.Tensor | None = None) -> torch.Tensor:
        """[B, K, C]: an embedding MLP (Linear, SiLU, Linear) as each region's LoRAs change it, its
        input x [B, in] changed per region by `change` [B, K, in] where given."""
        k = self.regions
        first, act, second = mlp[0], mlp[1], mlp[2]
        if change is None and f"{prefix}.0" not in self.time and f"{prefix}.2" not in self.time:
            return base.unsqueeze(1).expand(-1, k, -1)
        x = x.to(base.dtype)
        if change is None:
            h = first(x).unsqueeze(1).expand(-1, k, -1)
            if f"{prefix}.0" in self.time:
                h = h + self._per_region(self.time[f"{prefix}.0"], x, h[:, 0])
        else:
            if change.shape != (x.shape[0], k, x.shape[-1]):
                raise RuntimeError(f"region LoRAs: {prefix} got {tuple(x.shape)}, the vector changes are "
                                   f"{tuple(change.shape)}, not [rows, {k}, {x.shape[-1]}]")
            xk = x.unsqueeze(1) + change.to(x.device, x.dtype)  # each region's own input
            h = first(xk)
            if f"{prefix}.0" in self.time:
                d = self._each_region(self.time[f"{prefix}.0"], xk)
                h = h if d is None else h + d
        h = act(h)
        out = second(h)
        if f"{prefix}.2" in self.time:
            change = self._each_region(self.time[f"{prefix}.2"], h)
            out = out if change is None else out + change
        return out

    def _emb_regions(self) -> torch.Tensor | None:
        """[B, K, C]: the embedding the ResBlocks project, as each region's LoRAs change it (the
        time embedding, plus the vector embedding where the UNet has one), summed once per call."""
        if "sum" not in self._emb_parts:
            parts = list(self._emb_parts.values())
            if not parts:
                return None
            self._emb_parts["sum"] = sum(parts[1:], parts[0])
        return self._emb_parts["sum"]

    @contextmanager
    def installed(self) -> Iterator[RegionDeltas]:
        """Hooks on every changed module for the block; removed in `finally`."""
        handles = []
        try:
            for plan in (*self.plans.values(), *self.time.values()):  # ready before the first call
                weight = plan.module.weight
                plan.tensors(weight.dtype, weight.device)
            for name, plan in self.plans.items():
                if self.masked and _ATTN2_KV.search(name):
                    continue  # applied per region context by the regional attention
                if self.masked and name.endswith(_EMB):
                    handles += self._emb_hooks(name, plan)
                    continue
                body = self._conv if plan.is_conv else self._linear

                def hook(module, args, output, _plan=plan, _body=body):
                    return _body(_plan, args[0], output)

                handles.append(plan.module.register_forward_hook(hook))
            if self.time or self.vectors:
                for prefix in _EMBED_MLPS:
                    try:
                        mlp = self.root.get_submodule(prefix)
                    except AttributeError:  # SD1 has no vector embedding
                        continue

                    def keep_embeddings(module, args, output, _prefix=prefix):
                        if _prefix == _EMBED_MLPS[0]:  # the first of a UNet call: forget the last call's
                            self._emb_parts.clear()
                        self._emb_parts.pop("sum", None)
                        change = None
                        if self.vectors and _prefix == _VECTOR_MLP and self.vector_changes is not None:
                            change = self.vector_changes(args[0].shape[0])
                        self._emb_parts[_prefix] = self._region_mlp(module, _prefix, args[0], output, change)

                    handles.append(mlp.register_forward_hook(keep_embeddings))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._stash.clear()
            self._emb_parts.clear()

    def _emb_hooks(self, name: str, plan: _Plan) -> list:
        """emb_layers.1 keeps each region's change [B, K, C]; the block's out_layers adds it at the
        region's positions to the feature map it receives (h + emb_out, ldm's ResBlock)."""
        block = self.root.get_submodule(name[: -len(_EMB)])
        key = id(block)

        act = block.emb_layers[0]

        def keep(module, args, output):
            emb_regions = self._emb_regions()
            if emb_regions is None:
                self._stash[key] = self._per_region(plan, args[0], output)
                return
            if emb_regions.shape[0] != output.shape[0]:
                raise RuntimeError(f"region LoRAs: {name} got {output.shape[0]} rows, the time embedding "
                                   f"{emb_regions.shape[0]}")
            x = act(emb_regions.to(output.dtype))  # each region's embedding, projected
            out = F.linear(x, module.weight.to(x.dtype), None if module.bias is None else module.bias.to(x.dtype))
            change = self._each_region(plan, x)
            self._stash[key] = out - output.unsqueeze(1) + (0 if change is None else change)

        def add(module, args):
            d = self._stash.pop(key, None)
            if d is None:
                return None
            h = args[0]
            b, c, hh, ww = h.shape
            w, _ = self._position_weights((hh, ww), plan, h)
            return (h + torch.einsum("bkc,kn->bcn", d.to(h.dtype), w).reshape(b, c, hh, ww), *args[1:])

        return [plan.module.register_forward_hook(keep), block.out_layers.register_forward_pre_hook(add)]
