"""The contract between an attention module and `optim.MuonClip`.

MuonClip needs two things from each attention layer of a model:

1. the per-head maximum attention logit seen in the forward passes since the last
   optimizer step (post-RoPE, scaled by softmax_scale, causal-masked, signed), and
2. where that head's query and key rows live, so that the clip can rescale them.

Any `nn.Module` that provides the attributes below is a valid target; it does not
have to come from kimi_train. A plain multi-head attention looks like this::

    class Attention(nn.Module):
        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads, self.head_dim = num_heads, dim // num_heads
            self.q_proj = nn.Linear(dim, dim, bias=False)
            self.k_proj = nn.Linear(dim, dim, bias=False)
            self.v_proj = nn.Linear(dim, dim, bias=False)
            self.max_logits = None                 # [num_heads] fp32, or None

        def qk_clip_target(self):
            return QKClipTarget(kind="mha", w_q=self.q_proj.weight, w_k=self.k_proj.weight,
                                num_heads=self.num_heads)

        def reset_max_logits(self):
            self.max_logits = None

        def forward(self, x):
            q, k, v = ...
            with torch.no_grad():                  # record the exact per-head max
                s = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
                s = s.masked_fill(~causal_mask, float("-inf"))
                m = s.amax(dim=(0, 2, 3)).float()  # max over batch, queries, keys
                self.max_logits = m if self.max_logits is None else torch.maximum(self.max_logits, m)
            ...

Layouts (weights in the nn.Linear convention [out, in]; head h owns a contiguous
block of rows):

- ``"mha"``: w_q [H*d, in], w_k [H*d, in].
- ``"gqa"``: w_q [H*d, in], w_k [H_kv*d, in]; query head h belongs to KV group
  h // (H / H_kv).
- ``"mla"`` (DeepSeek-V3 / Kimi K2): w_q is q_b_proj.weight (or q_proj.weight
  without q LoRA) [H*(d_nope+d_rope), r_q]; w_k is kv_b_proj.weight
  [H*(d_nope+d_v), r_kv]. The shared k_rope lives in kv_a_proj_with_mqa and is
  never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Protocol, runtime_checkable

import torch

QKLayout = Literal["mha", "gqa", "mla"]


@dataclass
class QKClipTarget:
    """Where one attention layer's query and key rows live."""

    kind: QKLayout
    w_q: torch.Tensor
    w_k: torch.Tensor
    num_heads: int
    num_kv_heads: Optional[int] = None  # gqa only (mha: equals num_heads)
    qk_nope_head_dim: Optional[int] = None  # mla only
    qk_rope_head_dim: Optional[int] = None  # mla only
    v_head_dim: Optional[int] = None  # mla only
    alpha: float = 0.5  # mha/gqa: share of the clip applied to q (the rest to k)
    name: str = ""  # for logs and error messages, e.g. "layers.3.self_attn"


@runtime_checkable
class QKClipAttention(Protocol):
    """What `optim.MuonClip` needs from an attention module.

    ``max_logits``: a float32 tensor [num_heads] holding the running max of the
    attention logits over every forward pass since the last ``reset_max_logits()``,
    or None when no forward has been recorded (then the layer is not clipped).
    """

    max_logits: Optional[torch.Tensor]

    def qk_clip_target(self) -> QKClipTarget: ...

    def reset_max_logits(self) -> None: ...
