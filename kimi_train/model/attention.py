"""Attention: Multi-head Latent Attention (MLA, Kimi K2 / DeepSeek-V3) and GQA/MHA.

Legend (shape suffixes): B batch, T sequence, D hidden size, H query heads, K key/value heads
(GQA), N qk_nope_head_dim, R qk_rope_head_dim, Q = N + R, V v_head_dim, L kv_lora_rank,
X a fused width (e.g. [latent | k_rope]), E the GQA head dim, D2 rotary pairs.

MLA (arXiv 2405.04434, SPEC section 3):

    q          = q_b(RMSNorm(q_a(x)))            (or q_proj(x) without q LoRA)  -> per head [N | R]
    c_kv, k_r  = kv_a_proj_with_mqa(x)            -> [L | R]; k_r shared by every head
    k_n, v     = kv_b(RMSNorm(c_kv))              -> per head [N | V]
    q_r, k_r   = RoPE(q_r), RoPE(k_r)             (rope parts only)
    attention  = softmax(scale * [q_n|q_r] . [k_n|k_r]) v,   scale = Q^-0.5 (* YaRN mscale^2)

Both modules implement optim's QKClipAttention protocol: while `record_max_logits` is on
and the module is in training mode, every forward records the exact per-head max logit, and
`max_logits` ([H] fp32) is the max over the records, which `optim.MuonClip` reads and resets
after each step. Eval-mode forwards are not recorded, so evaluation never influences the clip,
and neither is a recomputation under activation checkpointing (model.recompute): the maximum is
one op (`kimi_train::per_head_max_logits`) that checkpointing stores rather than recomputes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from optim.protocol import QKClipTarget

from .config import ModelConfig
from .max_logits import per_head_max_logits_op
from .norm import RMSNorm
from .recompute import is_recomputing
from .rope import apply_rope, yarn_softmax_scale_multiplier


class _MaxLogitRecorder(nn.Module):
    """The QKClipAttention bookkeeping shared by MLA and GQA."""

    def __init__(self, cfg: ModelConfig, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.record_max_logits = cfg.record_max_logits
        self.max_logits_chunk = cfg.max_logits_chunk
        self._records: list[torch.Tensor] = []  # one [H] per recorded forward since the last reset
        self.name = ""  # set by the model ("layers.3.self_attn") for MuonClip's logs

    @property
    def max_logits(self) -> Optional[torch.Tensor]:
        """[H] fp32: the max over the forwards recorded since the last reset (None: none)."""
        if len(self._records) > 1:
            self._records = [torch.stack(self._records).amax(dim=0)]
        return self._records[0] if self._records else None

    @max_logits.setter
    def max_logits(self, value: Optional[torch.Tensor]) -> None:
        self._records = [] if value is None else [value]

    def reset_max_logits(self) -> None:
        self._records = []

    def _record(self, q_BHTQ: torch.Tensor, k_BKTQ: torch.Tensor, softmax_scale: float) -> None:
        if not (self.record_max_logits and self.training):
            return
        # Computed in a recomputation too (it must replay the forward's ops), recorded once.
        m_H = per_head_max_logits_op(q_BHTQ.detach(), k_BKTQ.detach(), softmax_scale, self.max_logits_chunk)
        if not is_recomputing():
            self._records.append(m_H)


class MLAttention(_MaxLogitRecorder):
    """Multi-head Latent Attention with decoupled RoPE; module names follow transformers' DeepseekV3."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.num_attention_heads)
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        Dqk = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * Dqk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # eps 1e-6 as in DeepSeek-V3's latent norms
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * Dqk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=False)
        self.softmax_scale = Dqk**-0.5 * yarn_softmax_scale_multiplier(cfg.rope_scaling)

    def init_weights(self, std: float, out_std: float) -> None:
        for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name).weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=out_std)
        for norm in (getattr(self, "q_a_layernorm", None), self.kv_a_layernorm):
            if norm is not None:
                norm.reset_parameters()
        self.reset_max_logits()

    def qk_clip_target(self) -> QKClipTarget:
        w_q = self.q_proj.weight if self.q_lora_rank is None else self.q_b_proj.weight
        return QKClipTarget(
            kind="mla", w_q=w_q, w_k=self.kv_b_proj.weight, num_heads=self.num_heads,
            qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim, name=self.name,
        )  # fmt: skip

    def forward(self, x_BTD: torch.Tensor, cos_TD2: torch.Tensor, sin_TD2: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, Dn, Dr, Dv = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        if self.q_lora_rank is None:
            q_BTX = self.q_proj(x_BTD)
        else:
            q_BTX = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BHTQ = rearrange(q_BTX, "b t (h q) -> b h t q", h=H)
        q_nope_BHTN, q_rope_BHTR = q_BHTQ.split([Dn, Dr], dim=-1)

        ckv_BTX = self.kv_a_proj_with_mqa(x_BTD)
        c_kv_BTL, k_rope_BTR = ckv_BTX.split([self.kv_lora_rank, Dr], dim=-1)
        kv_BHTX = rearrange(self.kv_b_proj(self.kv_a_layernorm(c_kv_BTL)), "b t (h x) -> b h t x", h=H)
        k_nope_BHTN, v_BHTV = kv_BHTX.split([Dn, Dv], dim=-1)

        q_rope_BHTR = apply_rope(q_rope_BHTR, cos_TD2, sin_TD2)
        k_rope_B1TR = apply_rope(k_rope_BTR.unsqueeze(1), cos_TD2, sin_TD2)

        q_BHTQ = torch.cat([q_nope_BHTN, q_rope_BHTR], dim=-1)
        k_BHTQ = torch.cat([k_nope_BHTN, k_rope_B1TR.expand(B, H, T, Dr)], dim=-1)
        self._record(q_BHTQ, k_BHTQ, self.softmax_scale)
        # Flash attention (CUDA, and torch's CPU kernel) wants v's head dim equal to q/k's; with
        # Dv < Dqk SDPA would fall back to the O(T^2)-memory math path. Zero-padding v costs
        # (Dqk - Dv) / Dv more PV work and changes nothing else (the padded outputs are 0).
        pad = Dn + Dr - Dv
        if pad > 0:
            v_BHTV = F.pad(v_BHTV, (0, pad))
        o_BHTQ = F.scaled_dot_product_attention(q_BHTQ, k_BHTQ, v_BHTV, is_causal=True, scale=self.softmax_scale)
        return self.o_proj(rearrange(o_BHTQ[..., :Dv], "b h t v -> b t (h v)"))


class GQAttention(_MaxLogitRecorder):
    """Grouped-query attention with RoPE on the whole head (MHA when Hkv == H)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.num_attention_heads)
        D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.gqa_head_dim
        self.num_kv_heads, self.head_dim = Hkv, Dh
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)
        self.softmax_scale = Dh**-0.5 * yarn_softmax_scale_multiplier(cfg.rope_scaling)

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=out_std)
        self.reset_max_logits()

    def qk_clip_target(self) -> QKClipTarget:
        kind = "mha" if self.num_kv_heads == self.num_heads else "gqa"
        return QKClipTarget(
            kind=kind, w_q=self.q_proj.weight, w_k=self.k_proj.weight, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, name=self.name,
        )  # fmt: skip

    def forward(self, x_BTD: torch.Tensor, cos_TD2: torch.Tensor, sin_TD2: torch.Tensor) -> torch.Tensor:
        H, Hkv = self.num_heads, self.num_kv_heads
        q_BHTE = apply_rope(rearrange(self.q_proj(x_BTD), "b t (h e) -> b h t e", h=H), cos_TD2, sin_TD2)
        k_BKTE = apply_rope(rearrange(self.k_proj(x_BTD), "b t (k e) -> b k t e", k=Hkv), cos_TD2, sin_TD2)
        v_BKTE = rearrange(self.v_proj(x_BTD), "b t (k e) -> b k t e", k=Hkv)
        self._record(q_BHTE, k_BKTE, self.softmax_scale)
        o_BHTE = F.scaled_dot_product_attention(
            q_BHTE, k_BKTE, v_BKTE, is_causal=True, scale=self.softmax_scale, enable_gqa=Hkv != H
        )
        return self.o_proj(rearrange(o_BHTE, "b h t e -> b t (h e)"))


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MLAttention(cfg) if cfg.attention_type == "mla" else GQAttention(cfg)


__all__ = ["MLAttention", "GQAttention", "build_attention"]
