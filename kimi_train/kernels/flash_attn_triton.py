"""EXPERIMENTAL: causal flash attention (forward + backward) that also returns the per-head max logit.

Legend: B batch, H query heads, Hkv key/value heads (query head h reads kv head
h // (H / Hkv)), T sequence, D q.k head dim (192 for MLA), Dv value head dim.

    o[b,h,i]       = sum_j softmax_j(scale * q_i . k_j, j <= i) v_j
    max_logits[h]  = max over b, i, j <= i of scale * q_i . k_j        (QK-Clip's statistic)

The forward is the usual online-softmax loop: per block of queries it keeps the
running row max m_i of the (base-2 scaled) logits, the running denominator l_i
and the output accumulator. m_i at the end of the loop IS the row's max logit,
so QK-Clip's statistic costs one extra reduction per query block instead of a
second pass over q and k (kimi_train.kernels.max_logits_triton).

The backward is FlashAttention-2's: D_i = rowsum(dO_i * O_i); one kernel walks
the query blocks for each key block (dK, dV), one walks the key blocks for each
query block (dQ), both recomputing P from the saved log-sum-exp. With GQA the
dK/dV of the query heads that share a kv head are summed afterwards.

Status: tested against PyTorch in fp32 through Triton's interpreter only; not
yet compiled or timed on a GPU, and not wired into the model. Use it through
``flash_attention_with_max``.
"""

from __future__ import annotations

import math

import torch

from .max_logits_triton import _split_head_dim

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:
    triton = None
    tl = None
    TRITON_AVAILABLE = False

__all__ = ["TRITON_AVAILABLE", "flash_attention_with_max"]

_LOG2E = 1.4426950408889634


if TRITON_AVAILABLE:

    def _fwd_kernel(
        Q, K, V, O, LSE, Partial,
        T, H, D, Dv, heads_per_kv, qk_scale, stride_p,
        sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
        BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        hk = (h // heads_per_kv).to(tl.int64)
        Q += b * sqb + h.to(tl.int64) * sqh
        K += b * skb + hk * skh
        V += b * svb + hk * svh
        O += b * sob + h.to(tl.int64) * soh

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d1 = tl.arange(0, BLOCK_D1)
        dv = tl.arange(0, BLOCK_DV)
        q1 = tl.load(Q + rows[:, None] * sqt + d1[None, :] * sqd, mask=(rows[:, None] < T) & (d1[None, :] < D),
                     other=0.0)
        if BLOCK_D2 > 0:
            d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
            q2 = tl.load(Q + rows[:, None] * sqt + d2[None, :] * sqd, mask=(rows[:, None] < T) & (d2[None, :] < D),
                         other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
        acc = tl.full((BLOCK_M, BLOCK_DV), 0.0, tl.float32)
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
        for n0 in range(0, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols[None, :] < T
            k1 = tl.load(K + cols[None, :] * skt + d1[:, None] * skd, mask=col_ok & (d1[:, None] < D), other=0.0)
            s = tl.dot(q1, k1, input_precision=PRECISION)
            if BLOCK_D2 > 0:
                k2 = tl.load(K + cols[None, :] * skt + d2[:, None] * skd, mask=col_ok & (d2[:, None] < D), other=0.0)
                s = tl.dot(q2, k2, s, input_precision=PRECISION)
            s = s * qk_scale
            s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(V + cols[:, None] * svt + dv[None, :] * svd, mask=(cols[:, None] < T) & (dv[None, :] < Dv),
                        other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        row_ok = rows < T
        l_safe = tl.where(row_ok, l_i, 1.0)
        tl.store(O + rows[:, None] * sot + dv[None, :] * sod, (acc / l_safe[:, None]).to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (dv[None, :] < Dv))
        tl.store(LSE + bh.to(tl.int64) * T + rows, m_i + tl.log2(l_safe), mask=row_ok)
        # m_i is the row max of scale * log2(e) * q.k: the max logit, in base-2 units.
        row_max = tl.where(row_ok, m_i, float("-inf"))
        tl.store(Partial + bh.to(tl.int64) * stride_p + pid_m, tl.max(row_max, axis=0))

    def _bwd_dkdv_kernel(
        Q, K, V, DO, LSE, Delta, DK, DV,
        T, H, D, Dv, heads_per_kv, qk_scale, scale,
        sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdob, sdoh, sdot, sdod,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
        BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """dK, dV of one key block for one QUERY head (summed over the GQA group outside)."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        hk = (h // heads_per_kv).to(tl.int64)
        Q += b * sqb + h.to(tl.int64) * sqh
        DO += b * sdob + h.to(tl.int64) * sdoh
        K += b * skb + hk * skh
        V += b * svb + hk * svh
        LSE += bh.to(tl.int64) * T
        Delta += bh.to(tl.int64) * T

        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < T
        d1 = tl.arange(0, BLOCK_D1)
        dv = tl.arange(0, BLOCK_DV)
        k1 = tl.load(K + cols[:, None] * skt + d1[None, :] * skd, mask=col_ok[:, None] & (d1[None, :] < D), other=0.0)
        v = tl.load(V + cols[:, None] * svt + dv[None, :] * svd, mask=col_ok[:, None] & (dv[None, :] < Dv), other=0.0)
        dk1 = tl.full((BLOCK_N, BLOCK_D1), 0.0, tl.float32)
        if BLOCK_D2 > 0:
            d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
            k2 = tl.load(K + cols[:, None] * skt + d2[None, :] * skd, mask=col_ok[:, None] & (d2[None, :] < D),
                         other=0.0)
            dk2 = tl.full((BLOCK_N, BLOCK_D2), 0.0, tl.float32)
        dv_acc = tl.full((BLOCK_N, BLOCK_DV), 0.0, tl.float32)
        # Queries i >= the first key of the block can see it.
        for m0 in range((pid_n * BLOCK_N) // BLOCK_M * BLOCK_M, T, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < T
            q1t = tl.load(Q + rows[None, :] * sqt + d1[:, None] * sqd, mask=row_ok[None, :] & (d1[:, None] < D),
                          other=0.0)
            st = tl.dot(k1, q1t, input_precision=PRECISION)  # [N, M]: s transposed
            if BLOCK_D2 > 0:
                q2t = tl.load(Q + rows[None, :] * sqt + d2[:, None] * sqd, mask=row_ok[None, :] & (d2[:, None] < D),
                              other=0.0)
                st = tl.dot(k2, q2t, st, input_precision=PRECISION)
            lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
            pt = tl.exp2(st * qk_scale - lse[None, :])
            pt = tl.where((cols[:, None] <= rows[None, :]) & row_ok[None, :], pt, 0.0)
            do = tl.load(DO + rows[:, None] * sdot + dv[None, :] * sdod, mask=row_ok[:, None] & (dv[None, :] < Dv),
                         other=0.0)
            dv_acc = tl.dot(pt.to(do.dtype), do, dv_acc, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [N, M]
            delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
            dst = (pt * (dpt - delta[None, :])).to(q1t.dtype)
            dk1 = tl.dot(dst, tl.trans(q1t), dk1, input_precision=PRECISION)
            if BLOCK_D2 > 0:
                dk2 = tl.dot(dst, tl.trans(q2t), dk2, input_precision=PRECISION)
        DK += bh.to(tl.int64) * T * D
        DV += bh.to(tl.int64) * T * Dv
        tl.store(DK + cols[:, None] * D + d1[None, :], dk1 * scale, mask=col_ok[:, None] & (d1[None, :] < D))
        if BLOCK_D2 > 0:
            tl.store(DK + cols[:, None] * D + d2[None, :], dk2 * scale, mask=col_ok[:, None] & (d2[None, :] < D))
        tl.store(DV + cols[:, None] * Dv + dv[None, :], dv_acc, mask=col_ok[:, None] & (dv[None, :] < Dv))

    def _bwd_dq_kernel(
        Q, K, V, DO, LSE, Delta, DQ,
        T, H, D, Dv, heads_per_kv, qk_scale, scale,
        sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdob, sdoh, sdot, sdod,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
        BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        hk = (h // heads_per_kv).to(tl.int64)
        Q += b * sqb + h.to(tl.int64) * sqh
        DO += b * sdob + h.to(tl.int64) * sdoh
        K += b * skb + hk * skh
        V += b * svb + hk * svh

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        d1 = tl.arange(0, BLOCK_D1)
        dv = tl.arange(0, BLOCK_DV)
        q1 = tl.load(Q + rows[:, None] * sqt + d1[None, :] * sqd, mask=row_ok[:, None] & (d1[None, :] < D), other=0.0)
        dq1 = tl.full((BLOCK_M, BLOCK_D1), 0.0, tl.float32)
        if BLOCK_D2 > 0:
            d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
            q2 = tl.load(Q + rows[:, None] * sqt + d2[None, :] * sqd, mask=row_ok[:, None] & (d2[None, :] < D),
                         other=0.0)
            dq2 = tl.full((BLOCK_M, BLOCK_D2), 0.0, tl.float32)
        do = tl.load(DO + rows[:, None] * sdot + dv[None, :] * sdod, mask=row_ok[:, None] & (dv[None, :] < Dv),
                     other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
        delta = tl.load(Delta + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
        for n0 in range(0, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < T
            k1t = tl.load(K + cols[None, :] * skt + d1[:, None] * skd, mask=col_ok[None, :] & (d1[:, None] < D),
                          other=0.0)
            s = tl.dot(q1, k1t, input_precision=PRECISION)
            if BLOCK_D2 > 0:
                k2t = tl.load(K + cols[None, :] * skt + d2[:, None] * skd, mask=col_ok[None, :] & (d2[:, None] < D),
                              other=0.0)
                s = tl.dot(q2, k2t, s, input_precision=PRECISION)
            p = tl.exp2(s * qk_scale - lse[:, None])
            p = tl.where((cols[None, :] <= rows[:, None]) & col_ok[None, :], p, 0.0)
            vt = tl.load(V + cols[None, :] * svt + dv[:, None] * svd, mask=col_ok[None, :] & (dv[:, None] < Dv),
                         other=0.0)
            dp = tl.dot(do, vt, input_precision=PRECISION)
            ds = (p * (dp - delta[:, None])).to(q1.dtype)
            dq1 = tl.dot(ds, tl.trans(k1t), dq1, input_precision=PRECISION)
            if BLOCK_D2 > 0:
                dq2 = tl.dot(ds, tl.trans(k2t), dq2, input_precision=PRECISION)
        DQ += bh.to(tl.int64) * T * D
        tl.store(DQ + rows[:, None] * D + d1[None, :], dq1 * scale, mask=row_ok[:, None] & (d1[None, :] < D))
        if BLOCK_D2 > 0:
            tl.store(DQ + rows[:, None] * D + d2[None, :], dq2 * scale, mask=row_ok[:, None] & (d2[None, :] < D))

    _compiled: dict = {}

    def _kernels(device: torch.device):
        """(fwd, dkdv, dq, fwd meta, bwd meta). Fixed tiles, not autotuned yet: on sm_90 at
        D=192/Dv=128 these compile without spills (forward) or with few (backward, whose
        dK, dV accumulators for a 192-dim key block need the smaller tile)."""
        kind = "cuda" if device.type == "cuda" else "interpreter"
        if kind not in _compiled:
            if kind == "cuda":
                fwd_meta = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
                bwd_meta = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
                jitted = (triton.jit(f) for f in (_fwd_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel))
                _compiled[kind] = (*jitted, fwd_meta, bwd_meta)
            else:
                from optim.triton_ns import interpreted

                fns = interpreted(_fwd_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel)
                # Forward with BLOCK_M > BLOCK_N, as on the GPU.
                _compiled[kind] = (*fns, {"BLOCK_M": 32, "BLOCK_N": 16}, {"BLOCK_M": 16, "BLOCK_N": 16})
        return _compiled[kind]


def _meta(q, v, meta):
    d1, d2 = _split_head_dim(q.shape[-1])
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return dict(meta, BLOCK_D1=d1, BLOCK_D2=d2, BLOCK_DV=max(16, triton.next_power_of_2(v.shape[-1])),
                PRECISION=precision)


class _FlashAttentionWithMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        B, H, T, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[-1]
        fwd, _, _, meta, _ = _kernels(q.device)
        meta = _meta(q, v, meta)
        o = torch.empty(B, H, T, Dv, device=q.device, dtype=q.dtype)
        lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
        n_m = triton.cdiv(T, meta["BLOCK_M"])
        partial = torch.full((B * H, n_m), float("-inf"), device=q.device, dtype=torch.float32)
        fwd[(n_m, B * H)](
            q, k, v, o, lse, partial, T, H, D, Dv, H // Hkv, scale * _LOG2E, partial.stride(0),
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), **meta,
        )
        max_H = partial.view(B, H, n_m).amax(dim=(0, 2)) / _LOG2E
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(max_H)
        return o, max_H

    @staticmethod
    def backward(ctx, do, _dmax):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[-1]
        _, dkdv, dq_kernel, _, meta = _kernels(q.device)
        meta = _meta(q, v, meta)
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1).view(B * H, T)
        dq = torch.empty(B, H, T, D, device=q.device, dtype=torch.float32)
        dk_h = torch.empty(B, H, T, D, device=q.device, dtype=torch.float32)
        dv_h = torch.empty(B, H, T, Dv, device=q.device, dtype=torch.float32)
        args = (T, H, D, Dv, H // Hkv, ctx.scale * _LOG2E, ctx.scale,
                *q.stride(), *k.stride(), *v.stride(), *do.stride())
        dkdv[(triton.cdiv(T, meta["BLOCK_N"]), B * H)](q, k, v, do, lse, delta, dk_h, dv_h, *args, **meta)
        dq_kernel[(triton.cdiv(T, meta["BLOCK_M"]), B * H)](q, k, v, do, lse, delta, dq, *args, **meta)
        G = H // Hkv  # the query heads sharing a kv head add their contributions
        dk = dk_h.view(B, Hkv, G, T, D).sum(2)
        dv = dv_h.view(B, Hkv, G, T, Dv).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def flash_attention_with_max(
    q_BHTD: torch.Tensor, k_BHkvTD: torch.Tensor, v_BHkvTDv: torch.Tensor, softmax_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention output [B, H, T, Dv] and the per-head max logit [H] fp32 (no gradient).

    Differentiable in q, k and v. ``softmax_scale`` defaults to 1/sqrt(D). EXPERIMENTAL:
    see the module docstring.
    """
    if q_BHTD.dim() != 4 or k_BHkvTD.dim() != 4 or v_BHkvTDv.dim() != 4:
        raise ValueError("flash_attention_with_max expects q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv]")
    B, H, T, D = q_BHTD.shape
    if k_BHkvTD.shape[:1] + k_BHkvTD.shape[2:] != (B, T, D) or v_BHkvTDv.shape[:3] != k_BHkvTD.shape[:3] \
            or H % k_BHkvTD.shape[1] != 0:
        raise ValueError(
            f"flash_attention_with_max: q {tuple(q_BHTD.shape)}, k {tuple(k_BHkvTD.shape)}, v {tuple(v_BHkvTDv.shape)} "
            "do not fit (same B and T, q/k same D, H divisible by Hkv)"
        )
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    if not scale > 0:
        raise ValueError(f"flash_attention_with_max softmax_scale={softmax_scale}; valid: a positive float")
    return _FlashAttentionWithMax.apply(q_BHTD, k_BHkvTD, v_BHkvTDv, scale)


if not TRITON_AVAILABLE:
    # Without triton, importing flash_attention_with_max by name fails with ImportError, the signal its
    # callers already treat as "no Triton kernel here"; TRITON_AVAILABLE stays importable.
    del flash_attention_with_max
    __all__ = ["TRITON_AVAILABLE"]
