"""sgm/modules/attention.py: CrossAttention, BasicTransformerBlock and SpatialTransformer.

What differs from ldm's classes and matters to code that hooks attention:
- `CrossAttention.forward(x, context=None, mask=None, additional_tokens=None,
  n_times_crossframe_attn_in_self=0)`: additional tokens are prepended to `x` and cut from the
  output; cross-frame attention repeats every n-th key/value. Attention is torch's SDPA with the
  default scale.
- `BasicTransformerBlock._forward` always passes `additional_tokens` (None unless given) to attn1
  and attn2 and `n_times_crossframe_attn_in_self` to attn1, so anything standing in for an
  attention forward must take those keywords (the host's optimised forwards take `**kwargs`).
  `forward` goes through sgm's `checkpoint(self._forward, (x, context), ...)`, which drops
  `additional_tokens` and the cross-frame count: `_forward` always sees their defaults.

The double builds the SDXL UNet with ldm's classes (lib_mos.models.sdxl.build_unet) and then gives
the attention modules and transformer blocks these classes (`convert_ldm_attention`): weights and
names are the same. The spatial transformers stay lib_mos's (ldm's class with sgm's forward: every
block attends to the one context), because ldm's TimestepEmbedSequential hands the context only to
ldm's class; the UNetModel is ldm's (the same forward with `y` through `label_emb`).
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0, backend=None):
        super().__init__()
        inner = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.backend = backend

    def forward(self, x, context=None, mask=None, additional_tokens=None, n_times_crossframe_attn_in_self=0):
        heads = self.heads
        n_extra = 0
        if additional_tokens is not None:
            n_extra = additional_tokens.shape[1]
            x = torch.cat([additional_tokens, x], dim=1)
        q = self.to_q(x)
        context = x if context is None else context
        k, v = self.to_k(context), self.to_v(context)
        if n_times_crossframe_attn_in_self:
            assert x.shape[0] % n_times_crossframe_attn_in_self == 0
            n_cp = x.shape[0] // n_times_crossframe_attn_in_self
            k = repeat(k[::n_times_crossframe_attn_in_self], "b ... -> (b n) ...", n=n_cp)
            v = repeat(v[::n_times_crossframe_attn_in_self], "b ... -> (b n) ...", n=n_cp)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = rearrange(out, "b h n d -> b n (h d)", h=heads)
        if additional_tokens is not None:
            out = out[:, n_extra:]
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    """attn1 (self-attention unless `disable_self_attn`), attn2 (cross), ff, with norm1..3. Built
    only by conversion from ldm's block (same submodules and names)."""

    def forward(self, x, context=None, additional_tokens=None, n_times_crossframe_attn_in_self=0):
        # sgm hands (x, context) to its checkpoint helper, so _forward sees only these two
        return self._forward(x, context)

    def _forward(self, x, context=None, additional_tokens=None, n_times_crossframe_attn_in_self=0):
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None,
                       additional_tokens=additional_tokens,
                       n_times_crossframe_attn_in_self=0 if self.disable_self_attn else n_times_crossframe_attn_in_self) + x
        x = self.attn2(self.norm2(x), context=context, additional_tokens=additional_tokens) + x
        return self.ff(self.norm3(x)) + x


def convert_ldm_attention(unet: nn.Module) -> nn.Module:
    """Give an ldm-built UNet's attention modules sgm's classes (the host runs sgm's for SDXL)."""
    from ldm.modules import attention as ldm_attention

    for module in unet.modules():
        if isinstance(module, ldm_attention.CrossAttention):
            module.__class__ = CrossAttention
            module.backend = None
        elif isinstance(module, ldm_attention.BasicTransformerBlock):
            module.__class__ = BasicTransformerBlock
    return unet
