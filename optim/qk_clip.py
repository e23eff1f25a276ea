"""QK-Clip: cap each attention head's max logit at tau by rescaling its q/k weights.

Shape legend: H = query heads, G = KV groups (GQA), R = rows of a weight [R, in].

After an optimizer step, with S_h the max logit head h produced in this step's
forward passes (post-RoPE, scaled, causal, signed; MAX-reduced over ranks):

    if S_h > tau:   gamma_h = tau / S_h   and rescale head h so that every one of its
                    logits q_i . k_j is multiplied by exactly gamma_h.

The logit is bilinear in q and k, so the rescale is split between them:

- MHA: q rows of h *= gamma^alpha, k rows of h *= gamma^(1 - alpha)  (alpha = 0.5).
- GQA: k rows are shared by a group of query heads, so the group gets one
  gamma_g = tau / max_{h in g} S_h (Megatron's policy): every q row of the group
  *= gamma_g^alpha, the group's k rows *= gamma_g^(1 - alpha). The group's top head
  lands exactly on tau, its other heads below.
- MLA (DeepSeek-V3 / Kimi K2): logit = q_nope . k_nope + q_rope . k_rope, where
  k_rope is ONE vector shared by all heads (from kv_a_proj_with_mqa). So
  q_nope *= sqrt(gamma), k_nope *= sqrt(gamma) (both per head, in q_b_proj and
  kv_b_proj) and q_rope *= gamma; k_rope, V, the latents and norms stay untouched.
  Both terms then scale by gamma.

Heads at or below tau are untouched bit for bit: a weight is only written when
some head of that weight is clipped, and every other row is multiplied by exactly
1.0, which IEEE arithmetic leaves bit-identical. A NaN/Inf max logit is an error
(the model has diverged), never a clip.

Every function rescales in place (call it under ``torch.no_grad()`` or on
parameters; it uses no_grad itself) and returns the number of query heads whose
max logit was over tau.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .layout import scale_rows_
from .protocol import QKClipTarget

__all__ = ["clip_mha_", "clip_gqa_", "clip_mla_", "clip_target_", "row_scales", "NonFiniteMaxLogit"]


class NonFiniteMaxLogit(ValueError):
    """A NaN/Inf max logit reached QK-Clip: the model has diverged (or overflowed on this
    batch). A ValueError, so callers that catch those keep working; nothing was clipped."""


def clip_mha_(
    w_q: Tensor, w_k: Tensor, max_logits: Tensor, tau: float, num_heads: int, alpha: float = 0.5, name: str = ""
) -> int:
    """Multi-head attention: w_q, w_k [H*d, in]; max_logits [H]."""
    return clip_gqa_(w_q, w_k, max_logits, tau, num_heads, num_heads, alpha=alpha, name=name)


def clip_gqa_(
    w_q: Tensor,
    w_k: Tensor,
    max_logits: Tensor,
    tau: float,
    num_heads: int,
    num_kv_heads: int,
    alpha: float = 0.5,
    name: str = "",
) -> int:
    """Grouped-query attention: w_q [H*d, in], w_k [G*d, in]; query head h is in group h // (H/G)."""
    target = QKClipTarget("gqa", w_q, w_k, num_heads, num_kv_heads=num_kv_heads, alpha=alpha, name=name)
    return clip_target_(target, max_logits, tau)


def clip_mla_(
    q_b_weight: Tensor,
    kv_b_weight: Tensor,
    max_logits: Tensor,
    tau: float,
    num_heads: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
    name: str = "",
) -> int:
    """Multi-head latent attention.

    q_b_weight: q_b_proj.weight (or q_proj.weight without q LoRA) [H*(d_nope+d_rope), r_q],
    kv_b_weight: kv_b_proj.weight [H*(d_nope+d_v), r_kv]. Per head h, with g = gamma_h:
    q rows [h, :d_nope] *= sqrt(g), q rows [h, d_nope:] *= g, kv rows [h, :d_nope] *= sqrt(g).
    """
    target = QKClipTarget("mla", q_b_weight, kv_b_weight, num_heads, qk_nope_head_dim=qk_nope_head_dim,
                          qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim, name=name)
    return clip_target_(target, max_logits, tau)


def clip_target_(target: QKClipTarget, max_logits: Tensor, tau: float) -> int:
    """Clip one layer described by a QKClipTarget (what attention modules hand to MuonClip):
    ``row_scales`` decides, ``optim.layout.scale_rows_`` writes (plain tensors and DTensors)."""
    clipped, q_scale_R, k_scale_R = row_scales(target, max_logits, tau)
    if clipped:
        scale_rows_(target.w_q, q_scale_R)
        scale_rows_(target.w_k, k_scale_R)
    return clipped


def row_scales(target: QKClipTarget, max_logits: Tensor, tau: float, q_shape: Optional[Sequence[int]] = None,
               k_shape: Optional[Sequence[int]] = None) -> tuple[int, Optional[Tensor], Optional[Tensor]]:
    """QK-Clip's decision for one layer: (clipped query heads, per-row factor of W_q, of W_k).

    The factors (fp64, one per row of the FULL weights; None when no head is over tau) are what
    every storage of the weights applies to the rows it holds: whole tensors and DTensor shards
    (``optim.layout.scale_rows_``), ZeRO flat fragments (optim.flat). ``q_shape`` / ``k_shape``:
    the full weights' shapes where the tensors do not show them (ZeRO-3's empty placeholders).
    Errors (one line, naming the layer): bad layouts, shapes, tau, and NaN/Inf max logits
    (``NonFiniteMaxLogit``).
    """
    t, where = target, _where(target.name)
    q_shape = tuple(t.w_q.shape if q_shape is None else q_shape)
    k_shape = tuple(t.w_k.shape if k_shape is None else k_shape)
    if t.kind in ("mha", "gqa"):
        num_kv = t.num_heads if t.kind == "mha" or t.num_kv_heads is None else t.num_kv_heads
        return _gqa_row_scales(q_shape, k_shape, max_logits, tau, t.num_heads, num_kv, t.alpha, where)
    if t.kind == "mla":
        dims = (t.qk_nope_head_dim, t.qk_rope_head_dim, t.v_head_dim)
        if any(d is None for d in dims):
            raise ValueError(f"QK-Clip{where}: kind='mla' needs qk_nope_head_dim, qk_rope_head_dim and v_head_dim")
        return _mla_row_scales(q_shape, k_shape, max_logits, tau, t.num_heads, *dims, where)  # type: ignore[arg-type]
    raise ValueError(f"QK-Clip{where}: kind={t.kind!r}; valid: 'mha', 'gqa', 'mla'")


def _gqa_row_scales(q_shape, k_shape, max_logits, tau, num_heads, num_kv_heads, alpha, where):
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"QK-Clip{where}: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"QK-Clip{where}: alpha={alpha} must be in [0, 1]")
    _check_rows(q_shape, num_heads, "w_q", where)
    _check_rows(k_shape, num_kv_heads, "w_k", where)
    if q_shape[0] // num_heads != k_shape[0] // num_kv_heads:
        raise ValueError(
            f"QK-Clip{where}: q head dim {q_shape[0] // num_heads} != k head dim {k_shape[0] // num_kv_heads}"
        )
    S_H = _checked_logits(max_logits, num_heads, tau, where)
    clipped = int((S_H > tau).sum())
    if clipped == 0:
        return 0, None, None
    S_G = S_H.view(num_kv_heads, num_heads // num_kv_heads).amax(dim=1)
    gamma_G = torch.where(S_G > tau, tau / S_G, torch.ones_like(S_G))
    gamma_H = gamma_G.repeat_interleave(num_heads // num_kv_heads)
    return (clipped, (gamma_H**alpha).repeat_interleave(q_shape[0] // num_heads),
            (gamma_G ** (1.0 - alpha)).repeat_interleave(k_shape[0] // num_kv_heads))


def _mla_row_scales(q_shape, k_shape, max_logits, tau, num_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, where):
    for key, value in (("qk_nope_head_dim", qk_nope_head_dim), ("qk_rope_head_dim", qk_rope_head_dim), ("v_head_dim", v_head_dim)):
        if value < 0:
            raise ValueError(f"QK-Clip{where}: {key}={value} must be >= 0")
    _check_rows(q_shape, num_heads, "q_b_weight", where, per_head=qk_nope_head_dim + qk_rope_head_dim)
    _check_rows(k_shape, num_heads, "kv_b_weight", where, per_head=qk_nope_head_dim + v_head_dim)
    S_H = _checked_logits(max_logits, num_heads, tau, where)
    over_H = S_H > tau
    clipped = int(over_H.sum())
    if clipped == 0:
        return 0, None, None
    gamma_H = torch.where(over_H, tau / S_H, torch.ones_like(S_H))
    sqrt_H1 = gamma_H.sqrt()[:, None]
    q_scale_HD = torch.cat([sqrt_H1.expand(-1, qk_nope_head_dim), gamma_H[:, None].expand(-1, qk_rope_head_dim)], dim=1)
    kv_scale_HD = torch.cat([sqrt_H1.expand(-1, qk_nope_head_dim), torch.ones_like(sqrt_H1).expand(-1, v_head_dim)], dim=1)
    return clipped, q_scale_HD.reshape(-1), kv_scale_HD.reshape(-1)


# --------------------------------------------------------------------------- helpers


def _where(name: str) -> str:
    return f" [{name}]" if name else ""


def _check_rows(shape: Sequence[int], heads: int, what: str, where: str, per_head: Optional[int] = None) -> None:
    if len(shape) != 2:
        raise ValueError(f"QK-Clip{where}: {what} must be a 2-D [out, in] weight, got shape {tuple(shape)}")
    if heads < 1:
        raise ValueError(f"QK-Clip{where}: number of heads {heads} must be >= 1")
    if per_head is None:
        if shape[0] % heads:
            raise ValueError(f"QK-Clip{where}: {what} has {shape[0]} rows, not a multiple of {heads} heads")
    elif shape[0] != heads * per_head:
        raise ValueError(
            f"QK-Clip{where}: {what} has {shape[0]} rows; expected {heads} heads x {per_head} = {heads * per_head}"
        )


def _checked_logits(max_logits: Tensor, num_heads: int, tau: float, where: str) -> Tensor:
    """max_logits as fp64 on the CPU (small: [H]); errors for bad shapes, tau or NaN/Inf."""
    if not (isinstance(tau, (int, float)) and 0 < tau < float("inf")):
        raise ValueError(f"QK-Clip{where}: tau={tau!r} must be a finite float > 0")
    if tuple(max_logits.shape) != (num_heads,):
        raise ValueError(f"QK-Clip{where}: max_logits has shape {tuple(max_logits.shape)}, expected ({num_heads},)")
    S_H = max_logits.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(S_H).all()):
        bad = [h for h in range(num_heads) if not torch.isfinite(S_H[h])]
        raise NonFiniteMaxLogit(
            f"QK-Clip{where}: non-finite max logit {S_H[bad[0]].item()} at head {bad[0]}; the model has diverged")
    return S_H
