"""Cross-attention behaviour as swappable per-module processors (set and reset by name).

The host replaces `CrossAttention.forward` at class level for its optimisations, so the project
never patches the class: it installs a bound `forward` on each attn2 *instance* and deletes it in
`finally`, which restores whatever the class provides. A processor receives the module, its layer
index (its family's order, `family.ModelFamily.attn2`) and the call's inputs.

A layer-wise context is a 4-D tensor [B, L, T, D]: attn2 layer l attends to [:, l]. Passing one
through a UNet without processors fails loudly (ldm's attention expects 3-D), never silently.

Regional sampling builds on this in `lib_mos.regional.attention`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lib_mos.models.family import attn2_modules


def attend(module: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention of `x` [B, N, C] over `context` [B, T, D] with module's weights."""
    h = module.heads
    q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
    b, n, inner = q.shape
    q, k, v = (t.reshape(t.shape[0], -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return module.to_out(out.transpose(1, 2).reshape(b, n, inner))


class Attn2Processor(Protocol):
    def __call__(self, module: nn.Module, layer: int, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor: ...


class LayerwiseContext:
    """ED-LoRA binding: layer l attends to its own slice of a [B, L, T, D] context; a 3-D context
    is used as is by every layer."""

    def __call__(self, module: nn.Module, layer: int, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if context is None:
            context = x
        elif context.dim() == 4:
            context = context[:, layer]
        return attend(module, x, context)


@contextmanager
def attn2_processor(unet: nn.Module, processor: Attn2Processor) -> Iterator[None]:
    """Route every attn2 call of `unet` through `processor` for the duration of the block."""
    modules = [m for _, m in attn2_modules(unet)]
    try:
        for layer, module in enumerate(modules):
            def forward(x, context=None, mask=None, _m=module, _l=layer, **kwargs):
                return processor(_m, _l, x, context)

            module.forward = forward
        yield
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)
