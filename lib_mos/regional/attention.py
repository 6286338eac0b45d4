"""Regional attention: each position blends the global prompt's attention with its regions'.

`regional_attention` computes the global and all region attentions of one attn2 layer in one
batched call and blends them by mask weights before `to_out`; `RegionalContext` is the attn2
processor (`lib_mos.models.attention`) that feeds it a row plan, and `SteppedRegionalContext`
spreads one denoising step's plan over the UNet calls the host makes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib_mos.models.attention import attend


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """[..., S, h*d] -> [..., h, S, d]"""
    return t.unflatten(-1, (h, t.shape[-1] // h)).transpose(-3, -2)


def region_blend_weights(region_weight: torch.Tensor, global_weight: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend weights from masks m [B, K, N] in [0, 1]: (w_global [B, N], w_regions [B, K, N]).

    With coverage c = sum_k m_k: w_k = m_k / max(c, 1), w_g = 1 - min(c, 1). Global attention is
    kept outside every region, replaced inside one, averaged where regions overlap, and blended
    along soft edges; the weights sum to 1 at every position. `global_weight` [K] (each region's
    share of the global prompt inside it, in [0, 1]) moves that share of w_k to w_g.
    """
    m = region_weight.float().clamp(0.0, 1.0)
    coverage = m.sum(1)
    w_global, w_regions = 1.0 - coverage.clamp(max=1.0), m / coverage.clamp(min=1.0).unsqueeze(1)
    if global_weight is not None:
        g = global_weight.to(w_regions.device, w_regions.dtype).reshape(1, -1, 1)
        w_global = w_global + (w_regions * g).sum(1)
        w_regions = w_regions * (1.0 - g)
    return w_global, w_regions


ContextDelta = Callable[[nn.Module, torch.Tensor], "torch.Tensor | None"]


def region_keys_values(module: nn.Module, region_context: torch.Tensor, context_delta: ContextDelta | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """to_k / to_v of every region's context [B, K, Tr, D] -> two [B, K, Tr, inner], each region's
    LoRA change (`context_delta`) applied to its own context only."""
    kk, vv = module.to_k(region_context), module.to_v(region_context)
    if context_delta is not None:
        for projection, projected in ((module.to_k, kk), (module.to_v, vv)):
            change = context_delta(projection, region_context)
            if change is not None:
                projected += change.to(projected.dtype)
    return kk, vv


def regional_attention(
    module: nn.Module,
    x: torch.Tensor,
    context: torch.Tensor,
    region_context: torch.Tensor,
    region_weight: torch.Tensor,
    global_weight: torch.Tensor | None = None,
    context_delta: ContextDelta | None = None,
    region_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    global_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Cross-attention of `x` [B, N, C] over the global `context` [B, T, D] and, per region k, over
    `region_context[:, k]` ([B, K, Tr, D]), blended by the masks `region_weight` [B, K, N] (see
    `region_blend_weights`, with each region's `global_weight` share; a row whose masks are all
    zero gets global attention only).

    `context_delta(projection, region_context)` -> [B, K, Tr, out] or None adds region LoRAs'
    changes of to_k / to_v, region k's on region k's context only (`region_loras.RegionDeltas`).
    `region_kv`: the regions' keys and values already projected (`region_keys_values`), which a
    caller keeps across denoising steps, since the region prompts do not change.
    `global_kv`: [B, K, T, inner] keys and values of the global context through each region's LoRA
    (`global_keys_values`); the share of the global prompt a region keeps inside it then attends
    to these, so that inside region k the global prompt is read as the UNet with k's LoRA reads it.

    to_q runs once; the global (when T == Tr) and all K region attentions are one batched
    scaled_dot_product_attention call; the blend happens before to_out so that runs once too.
    """
    b, n, _ = x.shape
    rows, k, tr = (region_kv[0] if region_kv is not None else region_context).shape[:3]
    if k == 0:
        return attend(module, x, context)
    if rows != b or region_weight.shape != (b, k, n) or context.shape[0] != b:
        raise ValueError(
            f"regional attention: x {tuple(x.shape)}, context {tuple(context.shape)}, region context "
            f"{tuple(region_context.shape)} and weights {tuple(region_weight.shape)} do not line up "
            f"(expected weights {(b, k, n)})"
        )
    h = module.heads
    q = module.to_q(x)
    inner = q.shape[-1]
    q = _heads(q, h)  # [B, h, N, d]
    shifted = None
    if global_kv is not None and global_weight is not None:  # the global share inside a region: its own slot
        w_global, w_regions = region_blend_weights(region_weight)
        g = global_weight.to(w_regions.device, w_regions.dtype).reshape(1, -1, 1)
        shifted, w_regions = w_regions * g, w_regions * (1.0 - g)
    else:
        w_global, w_regions = region_blend_weights(region_weight, global_weight)
    rk, rv = region_kv if region_kv is not None else region_keys_values(
        module, region_context.to(context.dtype), context_delta)  # [B, K, Tr, inner]
    fold = context.shape[1] == tr
    if fold:  # the global context is slot 0 of the same batched call
        kk = torch.cat([module.to_k(context).unsqueeze(1), rk.to(q.dtype)], 1)
        vv = torch.cat([module.to_v(context).unsqueeze(1), rv.to(q.dtype)], 1)
        weights = torch.cat([w_global.unsqueeze(1), w_regions], 1)
    else:
        kk, vv, weights = rk.to(q.dtype), rv.to(q.dtype), w_regions
    s = kk.shape[1]
    kk, vv = _heads(kk, h), _heads(vv, h)  # [B, S, h, T, d]
    qq = q.unsqueeze(1).expand(b, s, *q.shape[1:]).reshape(b * s, *q.shape[1:])
    out = F.scaled_dot_product_attention(qq, kk.flatten(0, 1), vv.flatten(0, 1)).view(b, s, *q.shape[1:])
    weights = weights.to(out.dtype)[:, :, None, :, None]
    # in place when no autograd graph needs `out` (a 10x cheaper blend than einsum on CPU)
    blended = (out.mul_(weights) if not out.requires_grad else out * weights).sum(1)  # [B, h, N, d]
    if not fold:
        glob = F.scaled_dot_product_attention(q, _heads(module.to_k(context), h), _heads(module.to_v(context), h))
        blended = blended + glob * w_global.to(glob.dtype)[:, None, :, None]
    if shifted is not None:
        gk, gv = (_heads(t.to(q.dtype), h) for t in global_kv)  # [B, K, h, T, d]
        qk = q.unsqueeze(1).expand(b, k, *q.shape[1:]).reshape(b * k, *q.shape[1:])
        glob = F.scaled_dot_product_attention(qk, gk.flatten(0, 1), gv.flatten(0, 1)).view(b, k, *q.shape[1:])
        blended = blended + (glob * shifted.to(glob.dtype)[:, :, None, :, None]).sum(1)
    # to_out is affine (Linear, then Dropout: identity in eval), and the weights sum to 1 at every
    # position, so to_out(sum_s w_s o_s) == sum_s w_s to_out(o_s): blending first is exact.
    return module.to_out(blended.transpose(1, 2).reshape(b, n, inner))


def global_keys_values(module: nn.Module, context: torch.Tensor, regions: int, context_delta: ContextDelta,
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """to_k / to_v of the global context [B, T, D] through each region's LoRA: two [B, K, T, inner];
    None when no region LoRA changes this layer's keys or values."""
    wide = context.unsqueeze(1).expand(-1, regions, -1, -1)
    changes = [context_delta(projection, wide) for projection in (module.to_k, module.to_v)]
    if all(c is None for c in changes):
        return None
    return tuple(projection(context).unsqueeze(1) + (0 if c is None else c.to(context.dtype))
                 for projection, c in zip((module.to_k, module.to_v), changes))


def _version(t: torch.Tensor) -> int:
    """The tensor's in-place version; 0 for an inference tensor (Forge loads its weights in inference
    mode), which keeps no counter: its LoRA patching puts new tensors in place, so the address
    tells the change."""
    return 0 if t.is_inference() else t._version


class RegionalContext:
    """attn2 processor for regional sampling: global attention plus per-region attention, blended.

    The caller gives a row plan before each UNet call (`set_rows`), because only the caller knows
    which batch rows are which image's cond or uncond (the host batches them in several ways):

    - region_context: [B, K, Tr, D], or layer-wise [B, L, K, Tr, D] (layer l uses [:, l]), the
      region prompts of each row (cond rows: region prompts; uncond rows: region negatives). Rows
      with fewer regions than K pad with anything and give those slots zero weight. With `rows`
      ([B] indices), region_context holds only the distinct contexts [U, ...] and row b uses
      region_context[rows[b]] (a batch of images shares one set of region prompts and negatives).
    - weights: one tensor per attn2 layer (SD1 order), [B, K, N_l] masks in [0, 1] at that
      layer's resolution (`regions.layer_masks`), or [K, N_l] shared by all rows.
    - context: optional [B, T, D] or [B, L, T, D] replacing the UNet call's own context (e.g. the
      layer-wise bound global prompt); by default the call's context is used, [:, l] when 4-D.
    - global_weight: optional [K], each region's share of the global prompt inside it.

    `context_delta` (attribute) adds region LoRAs' to_k / to_v changes (see `regional_attention`).

    The regions' keys and values (to_k / to_v of the distinct region contexts, LoRA changes
    included) are kept per layer while the plan's region_context, the projection weights (also
    their in-place version) and `context_delta` stay the same: sampling projects each region
    prompt once per layer, not once per step (outside autograd only). `clear_rows` drops them.

    A call whose batch or resolution does not match the plan raises, never broadcasts silently.
    """

    def __init__(
        self,
        region_context: torch.Tensor | None = None,
        weights: Sequence[torch.Tensor] | None = None,
        context: torch.Tensor | None = None,
    ) -> None:
        self._plan: tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None] | None = None
        self._rows: torch.Tensor | None = None
        self._active: list[bool] = []
        self._kv: dict[tuple[int, int], tuple[tuple, torch.Tensor, object, torch.Tensor, torch.Tensor]] = {}
        self.global_weight: torch.Tensor | None = None
        self.context_delta: ContextDelta | None = None
        if region_context is not None or weights is not None:
            if region_context is None or weights is None:
                raise ValueError("RegionalContext needs both region_context and weights, or neither")
            self.set_rows(region_context, weights, context)

    def set_rows(
        self,
        region_context: torch.Tensor,
        weights: Sequence[torch.Tensor],
        context: torch.Tensor | None = None,
        global_weight: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Install the row plan for the next UNet call(s); see the class docstring for shapes."""
        if region_context.dim() not in (4, 5):
            raise ValueError(f"region_context must be [B, K, Tr, D] or [B, L, K, Tr, D], got {tuple(region_context.shape)}")
        layers = len(weights)
        if region_context.dim() == 5 and region_context.shape[1] != layers:
            raise ValueError(f"layer-wise region_context has {region_context.shape[1]} layers, weights {layers}")
        if context is not None and context.dim() == 4 and context.shape[1] != layers:
            raise ValueError(f"layer-wise context has {context.shape[1]} layers, weights {layers}")
        if rows is not None and (rows.dim() != 1 or (len(rows) and int(rows.max()) >= region_context.shape[0])):
            raise ValueError(f"rows {tuple(rows.shape)} must index the {region_context.shape[0]} region contexts")
        b, k = (len(rows) if rows is not None else region_context.shape[0]), region_context.shape[-3]
        plan = []
        for layer, w in enumerate(weights):
            if w.dim() == 2:
                w = w.unsqueeze(0).expand(b, -1, -1)
            if w.dim() != 3 or w.shape[:2] != (b, k):
                raise ValueError(f"layer {layer}: weights {tuple(w.shape)} do not match {b} rows and {k} regions")
            plan.append(w)
        if context is not None and context.shape[0] != b:
            raise ValueError(f"context has {context.shape[0]} rows, region_context {b}")
        if global_weight is not None and tuple(global_weight.shape) != (k,):
            raise ValueError(f"global_weight {tuple(global_weight.shape)} does not match {k} regions")
        self._plan = (region_context, plan, context)
        self._rows = rows
        self.global_weight = global_weight if global_weight is not None and bool(global_weight.any()) else None
        self._active = [k > 0 and bool(w.any()) for w in plan]  # all-zero layer: plain attention

    def clear_rows(self) -> None:
        """Forget the plan, so a UNet call nobody planned for fails instead of reusing stale rows."""
        self._plan = None
        self._rows = None
        self._active = []
        self._kv = {}

    def _region_kv(self, module: nn.Module, layer: int, region_context: torch.Tensor, like: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct region contexts' keys and values at this layer, kept while nothing they
        depend on changes (see the class docstring), one entry per source of LoRA changes (region
        passes switch `context_delta` between calls). The kept entry holds region_context and that
        source, so no other object can take their addresses while it is kept."""
        if torch.is_grad_enabled() and module.to_k.weight.requires_grad:
            return region_keys_values(module, region_context.to(like.device, like.dtype), self.context_delta)
        source = getattr(self.context_delta, "__self__", self.context_delta)  # a bound method's object
        key = (region_context.data_ptr(), tuple(region_context.shape), region_context.stride(), like.dtype,
               like.device, self.context_delta.__func__ if hasattr(self.context_delta, "__func__") else None,
               *((w.data_ptr(), _version(w)) for w in (module.to_k.weight, module.to_v.weight)))
        kept = self._kv.get((layer, id(source)))
        if kept is None or kept[0] != key:
            kk, vv = region_keys_values(module, region_context.to(like.device, like.dtype), self.context_delta)
            kept = self._kv[(layer, id(source))] = (key, region_context, source, kk, vv)
        return kept[3], kept[4]

    def __call__(self, module: nn.Module, layer: int, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if self._plan is None:
            raise RuntimeError("RegionalContext: no row plan; call set_rows() before the UNet")
        region_context, weights, override = self._plan
        if override is not None:
            context = override
        if context is None:
            context = x
        elif context.dim() == 4:
            context = context[:, layer]
        w = weights[layer]
        if x.shape[0] != w.shape[0] or x.shape[1] != w.shape[2]:
            raise ValueError(
                f"attn2 layer {layer}: the UNet call has {x.shape[0]} rows of {x.shape[1]} positions, the row "
                f"plan {w.shape[0]} rows of {w.shape[2]}; set_rows() for this call's batch and size"
            )
        if not self._active[layer]:
            return attend(module, x, context.to(x.device, x.dtype))
        if region_context.dim() == 5:
            region_context = region_context[:, layer]
        kk, vv = self._region_kv(module, layer, region_context, x)
        if self._rows is not None:
            rows = self._rows.to(kk.device)
            kk, vv = kk.index_select(0, rows), vv.index_select(0, rows)
        context = context.to(x.device, x.dtype)
        global_kv = None
        if self.global_weight is not None and self.context_delta is not None:
            global_kv = global_keys_values(module, context, w.shape[1], self.context_delta)
        return regional_attention(
            module, x, context, region_context, w.to(x.device),
            self.global_weight, region_kv=(kk, vv), global_kv=global_kv,
        )


class SteppedRegionalContext:
    """`RegionalContext` for hosts that spread one denoising step's rows over several UNet calls.

    The caller gives the plan for ALL rows of a step, in A1111's order (every cond row, then every
    uncond row). By default each UNet call takes the next rows of the step, as many as it has.
    This holds in every batching mode of A1111 (one call; chunks of batch_size; cond chunks then
    an uncond call when token lengths differ; uncond rows dropped by NGMS or skip-early-CFG),
    because all of them process the rows as contiguous slices in that order. A host that orders a
    call's rows otherwise (Forge: uncond chunks first, each call saying which chunk is which) names
    the call's rows itself with `begin_call` before the call. A new call is recognised at attn2
    layer 0, which every UNet call passes exactly once, or earlier by `begin_call` or by
    `vector_changes`, called from the UNet's vector embedding before any attention.
    """

    def __init__(self) -> None:
        self.inner = RegionalContext()
        self._step: tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None] | None = None
        self._rows: torch.Tensor | None = None
        self._global_weight: torch.Tensor | None = None
        self._vectors: torch.Tensor | None = None
        self._cursor = 0
        self._begun: torch.Tensor | None = None  # the step rows of the call begun, before its layer 0
        self._held: torch.Tensor | None = None  # rows every UNet call uses while held (region passes)
        self._pass_weights: list[torch.Tensor] | None = None  # a pass's masks per layer, replacing the step's
        self.error: BaseException | None = None  # raised at the next call (hosts swallow callback errors)

    def set_step(self, region_context: torch.Tensor, weights: Sequence[torch.Tensor],
                 context: torch.Tensor | None = None, global_weight: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None, vectors: torch.Tensor | None = None) -> None:
        """Rows of the whole step: region_context [R, (L,) K, Tr, D] (or its distinct contexts [U, ...]
        with `rows` [R] saying which each row uses), weights per layer [R, K, N_l] or [K, N_l],
        optional context [R, (L,) T, D] replacing the call's own, optional [K] shares of the global
        prompt inside the regions, optional [R, K, V] changes of each row's vector input per region
        (handed out by `vector_changes`)."""
        self._step = (region_context, list(weights), context)
        self._rows = rows
        self._global_weight = global_weight
        self._vectors = vectors
        self._cursor = 0
        self._begun = None

    def clear(self) -> None:
        self._step = None
        self._rows = None
        self._vectors = None
        self._cursor = 0
        self._begun = None
        self._held = None
        self._pass_weights = None
        self.inner.clear_rows()

    @contextlib.contextmanager
    def same_rows(self, n: int) -> Iterator[None]:
        """Take the next n rows of the step (or the rows `begin_call` named) once and give them to
        every UNet call in the block: the region passes of one host call run the UNet on the same
        rows once per pass."""
        self._held = self._begun if self._begun is not None else self._take(n)
        try:
            yield
        finally:
            self._held = None
            self._pass_weights = None

    def use_pass(self, weights: Sequence[torch.Tensor] | None, context_delta: ContextDelta | None) -> None:
        """The next UNet call draws a pass: its masks per layer ([K, N_l], None: the step's) and its
        region LoRAs' key/value changes."""
        self._pass_weights = None if weights is None else list(weights)
        self.inner.context_delta = context_delta

    def _total(self) -> int:
        if self.error is not None:
            raise self.error
        if self._step is None:
            raise RuntimeError("SteppedRegionalContext: no plan for this denoising step")
        return len(self._rows) if self._rows is not None else self._step[0].shape[0]

    def _take(self, n: int) -> torch.Tensor:
        """The next n rows of the step, for the UNet call that starts now."""
        total = self._total()
        a, b = self._cursor, self._cursor + n
        if b > total:
            raise RuntimeError(f"the UNet call needs rows {a}:{b} but the step has {total}")
        self._cursor = b
        return torch.arange(a, b)

    def begin_call(self, rows: torch.Tensor) -> None:
        """Begin a UNet call whose rows are the step's rows `rows` ([n] indices, in the call's order),
        for hosts whose calls do not take the step's rows in order (see the class docstring)."""
        total = self._total()
        if rows.dim() != 1 or (len(rows) and not 0 <= int(rows.min()) <= int(rows.max()) < total):
            raise RuntimeError(f"the UNet call names rows {rows.tolist()} but the step has {total}")
        self._begun = rows

    def vector_changes(self, n: int) -> torch.Tensor | None:
        """Begin a UNet call of n rows (before its attention) and give its rows' [n, K, V] vector
        changes (None when the step has none); attn2 layer 0 of the same call then takes no rows."""
        if self._begun is None:
            self._begun = self._held if self._held is not None else self._take(n)
        rows = self._begun
        return None if self._vectors is None else self._vectors.index_select(0, rows.to(self._vectors.device))

    def __call__(self, module: nn.Module, layer: int, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if self.error is not None:
            raise self.error
        if layer == 0:
            begun, self._begun = self._begun, None
            taken = begun if begun is not None else self._held if self._held is not None else self._take(x.shape[0])
            if len(taken) != x.shape[0]:
                raise RuntimeError(f"the UNet call began with {len(taken)} rows but its attention has {x.shape[0]}")
            region_context, weights, override = self._step
            weights = self._pass_weights or weights

            # a slice (a view) when the rows are contiguous, as in A1111; decided once per call, not per layer
            a = int(taken[0]) if len(taken) else 0
            contiguous = torch.equal(taken, torch.arange(a, a + len(taken)))

            def pick(t: torch.Tensor) -> torch.Tensor:
                return t[a:a + len(taken)] if contiguous else t.index_select(0, taken.to(t.device))

            if self._rows is None:
                region_context, rows = pick(region_context), None
            else:
                rows = pick(self._rows)
            self.inner.set_rows(region_context, [pick(w) if w.dim() == 3 else w for w in weights],
                                None if override is None else pick(override), self._global_weight, rows)
        return self.inner(module, layer, x, context)
