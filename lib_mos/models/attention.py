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

SCORES_BYTES = 2**28  # attention scores held at once (`attend` splits the queries beyond this)


def attend(module: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention of `x` [B, N, C] over `context` [B, T, D] with module's weights.
    Queries go in slices whose float32 scores stay under `SCORES_BYTES` (self-attention over a
    64x64 latent is 4096 x 4096 per head: on the CPU, where SDPA may materialise them, a batch of
    six would otherwise hold gigabytes)."""
    h = module.heads
    q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
    b, n, inner = q.shape
    q, k, v = (t.reshape(t.shape[0], -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
    step = max(1, SCORES_BYTES // (4 * q.shape[0] * h * k.shape[2]))
    out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + step], k, v) for i in range(0, n, step)], dim=2) \
        if step < n else F.scaled_dot_product_attention(q, k, v)
    return module.to_out(out.transpose(1, 2).reshape(b, n, inner))


@contextmanager
def bounded_self_attention(unet: nn.Module) -> Iterator[None]:
    """Every attn1 (self-attention) of `unet` through `attend` for the duration of the block, so
    its scores stay bounded (ldm's own materialises them all in float32)."""
    modules = [m for name, m in unet.named_modules() if name.rsplit(".", 1)[-1] == "attn1"]
    try:
        for module in modules:
            def forward(x, context=None, mask=None, _m=module, **kwargs):
                return attend(_m, x, x)

            module.forward = forward
        yield
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)


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
