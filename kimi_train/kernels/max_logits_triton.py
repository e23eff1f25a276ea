"""Per-head maximum attention logit for QK-Clip, tiled, without the T x T score matrix.

Legend: B batch, H query heads, Hkv key heads (GQA: query head h reads key head
h // (H / Hkv); MLA and MHA: Hkv == H), T sequence, D q.k head dim (192 for
K2's MLA: 128 nope + 64 rope).

    max_logits[h] = softmax_scale * max over b, and over 0 <= j <= i < T, of q[b, h, i] . k[b, h_kv, j]

It is the statistic that QK-Clip compares with tau: causal, post-RoPE, scaled and
signed (a head whose logits are all negative reports a negative max).

Each program owns one block of BLOCK_M queries of one (batch, head) and streams
key blocks 0 .. its diagonal, flash-attention style, keeping an elementwise
running max of the score tile in registers. Key blocks strictly below the
diagonal need no mask; the diagonal block is causal-masked; blocks above it are
never visited. Rows past T are dropped at the end. The head dim is covered by
one or two power-of-two chunks (192 = 128 + 64), so MLA's 192 pays no padding.
Each program writes one partial max; ``amax`` over batch and query blocks
finishes the job. The scale is applied after the max (it is positive, so the
order does not matter and no multiply sits in the inner loop).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:
    triton = None
    tl = None
    TRITON_AVAILABLE = False

__all__ = ["TRITON_AVAILABLE", "max_logits_triton"]


if TRITON_AVAILABLE:

    def _max_logits_kernel(
        Q, Kk, Partial,
        T, H, D, heads_per_kv, stride_p,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        q_base = Q + b * stride_qb + h.to(tl.int64) * stride_qh
        k_base = Kk + b * stride_kb + (h // heads_per_kv).to(tl.int64) * stride_kh

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d1 = tl.arange(0, BLOCK_D1)
        q1 = tl.load(q_base + rows[:, None] * stride_qt + d1[None, :] * stride_qd,
                     mask=(rows[:, None] < T) & (d1[None, :] < D), other=0.0)
        if BLOCK_D2 > 0:
            d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
            q2 = tl.load(q_base + rows[:, None] * stride_qt + d2[None, :] * stride_qd,
                         mask=(rows[:, None] < T) & (d2[None, :] < D), other=0.0)

        running = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
        diag = pid_m * BLOCK_M  # keys below this index are visible to every query of the block
        for n0 in range(0, diag, BLOCK_N):  # strictly below the diagonal: no mask
            cols = n0 + tl.arange(0, BLOCK_N)
            k1 = tl.load(k_base + cols[None, :] * stride_kt + d1[:, None] * stride_kd, mask=d1[:, None] < D, other=0.0)
            s = tl.dot(q1, k1, input_precision=PRECISION)
            if BLOCK_D2 > 0:
                k2 = tl.load(k_base + cols[None, :] * stride_kt + d2[:, None] * stride_kd,
                             mask=d2[:, None] < D, other=0.0)
                s = tl.dot(q2, k2, s, input_precision=PRECISION)
            running = tl.maximum(running, s)
        for n0 in range(diag, tl.minimum(diag + BLOCK_M, T), BLOCK_N):  # the diagonal: causal mask
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols[None, :] < T
            k1 = tl.load(k_base + cols[None, :] * stride_kt + d1[:, None] * stride_kd,
                         mask=col_ok & (d1[:, None] < D), other=0.0)
            s = tl.dot(q1, k1, input_precision=PRECISION)
            if BLOCK_D2 > 0:
                k2 = tl.load(k_base + cols[None, :] * stride_kt + d2[:, None] * stride_kd,
                             mask=col_ok & (d2[:, None] < D), other=0.0)
                s = tl.dot(q2, k2, s, input_precision=PRECISION)
            s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
            running = tl.maximum(running, s)
        row_max = tl.max(running, axis=1)
        row_max = tl.where(rows < T, row_max, float("-inf"))
        tl.store(Partial + bh.to(tl.int64) * stride_p + pid_m, tl.max(row_max, axis=0))

    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 4)]
    ]
    # fp32 (IEEE dot products) is for checking, not speed: one small tile that compiles quickly.
    _CONFIGS_FP32 = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)]
    _INTERPRETER_META = {"BLOCK_M": 32, "BLOCK_N": 16}  # BLOCK_M > BLOCK_N like most GPU configs
    _compiled: dict = {}

    def _kernel(device: torch.device, dtype: torch.dtype):
        kind = ("cuda", dtype == torch.float32) if device.type == "cuda" else "interpreter"
        if kind not in _compiled:
            if kind != "interpreter":
                configs = _CONFIGS_FP32 if kind[1] else _CONFIGS
                _compiled[kind] = (triton.autotune(configs, key=["T", "D"])(triton.jit(_max_logits_kernel)), configs)
            else:
                from optim.triton_ns import interpreted

                _compiled[kind] = (*interpreted(_max_logits_kernel), None)
        return _compiled[kind]


def _split_head_dim(D: int) -> tuple[int, int]:
    """Two power-of-two chunks (each >= 16, tl.dot's minimum) covering D: 192 -> (128, 64), 80 -> (64, 16)."""
    if D <= 16:
        return 16, 0
    d1 = 1 << (D.bit_length() - 1)
    rest = D - d1
    return d1, (0 if rest == 0 else max(16, 1 << (rest - 1).bit_length()))


def max_logits_triton(q_BHTD: torch.Tensor, k_BHkvTD: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """[H] fp32: softmax_scale * causal max of q.k per head over batch, queries and keys.

    q_BHTD [B, H, T, D], k_BHkvTD [B, Hkv, T, D] with H % Hkv == 0 (any strides;
    bf16, fp16 or fp32). Runs without autograd; CPU tensors use Triton's interpreter.
    """
    if q_BHTD.dim() != 4 or k_BHkvTD.dim() != 4:
        raise ValueError(
            f"max_logits_triton expects q [B, H, T, D] and k [B, Hkv, T, D]; got {tuple(q_BHTD.shape)}, "
            f"{tuple(k_BHkvTD.shape)}"
        )
    B, H, T, D = q_BHTD.shape
    Bk, Hkv, Tk, Dk = k_BHkvTD.shape
    if (Bk, Tk, Dk) != (B, T, D) or Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"max_logits_triton: k {tuple(k_BHkvTD.shape)} does not match q {tuple(q_BHTD.shape)} "
            "(need the same B, T, D and H divisible by Hkv)"
        )
    if not softmax_scale > 0:
        raise ValueError(f"max_logits_triton softmax_scale={softmax_scale}; valid: a positive float")
    if q_BHTD.dtype != k_BHkvTD.dtype:
        raise ValueError(f"max_logits_triton dtypes differ: q {q_BHTD.dtype}, k {k_BHkvTD.dtype}")
    if B == 0 or T == 0:
        return torch.full((H,), float("-inf"), device=q_BHTD.device, dtype=torch.float32)
    kernel, configs = _kernel(q_BHTD.device, q_BHTD.dtype)
    meta = _INTERPRETER_META if configs is None else {}
    # One partial per (batch, head, query block); sized for the smallest BLOCK_M an autotune config may pick.
    min_block_m = meta.get("BLOCK_M") or min(c.kwargs["BLOCK_M"] for c in configs)
    partial = torch.full((B * H, triton.cdiv(T, min_block_m)), float("-inf"), device=q_BHTD.device,
                         dtype=torch.float32)
    d1, d2 = _split_head_dim(D)

    def grid(META):
        return (triton.cdiv(T, META["BLOCK_M"]), B * H)

    with torch.no_grad():
        kernel[grid](
            q_BHTD, k_BHkvTD, partial, T, H, D, H // Hkv, partial.stride(0),
            *q_BHTD.stride(), *k_BHkvTD.stride(),
            BLOCK_D1=d1, BLOCK_D2=d2, PRECISION="ieee" if q_BHTD.dtype == torch.float32 else "tf32", **meta,
        )
    return partial.view(B, H, -1).amax(dim=(0, 2)) * softmax_scale  # one partial per (sequence, head, block)


if not TRITON_AVAILABLE:
    # Without triton, importing max_logits_triton by name fails with ImportError, the signal its
    # callers already treat as "no Triton kernel here"; TRITON_AVAILABLE stays importable.
    del max_logits_triton
    __all__ = ["TRITON_AVAILABLE"]
