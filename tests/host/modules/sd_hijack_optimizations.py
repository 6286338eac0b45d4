"""Cross-attention optimisation: the host replaces `CrossAttention.forward` at class level
(sdp, xformers, Doggettx...), ldm's and sgm's alike (SDXL runs sgm's class). The double installs an
SDPA forward the same way on both, taking and ignoring sgm's extra keywords (`additional_tokens`,
`n_times_crossframe_attn_in_self`) as the host's forwards do (`**kwargs`), so code that
patches the class instead of hooking instances would break here as it breaks in the host."""

from __future__ import annotations

import sgm.modules.attention
import torch
from ldm.modules.attention import CrossAttention

_original_forward = CrossAttention.forward
_original_sgm_forward = sgm.modules.attention.CrossAttention.forward


def scaled_dot_product_attention_forward(self, x, context=None, mask=None, **kwargs):
    h = self.heads
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, _, inner = q.shape
    q, k, v = (t.view(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(b, -1, inner).to(q.dtype)
    return self.to_out(out)


def apply() -> None:
    CrossAttention.forward = scaled_dot_product_attention_forward
    sgm.modules.attention.CrossAttention.forward = scaled_dot_product_attention_forward


def undo() -> None:
    CrossAttention.forward = _original_forward
    sgm.modules.attention.CrossAttention.forward = _original_sgm_forward
