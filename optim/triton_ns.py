"""Triton kernels for the Newton-Schulz iteration of Muon.

One NS step with coefficients (a, b, c) is

    A = X X^T            # [n, n], symmetric
    B = b A + c A A      # symmetric too: A A = A A^T because A is symmetric
    X = a X + B X        # [n, m]

Three kernels do it, each on a batch of matrices (program axis 1 is the batch):

1. ``_sym_mm_kernel`` computes ``alpha * Y Y^T + beta * Z`` for a symmetric ``Z``.
   The result is symmetric, so only the lower triangle of output tiles is
   computed (tile (i, j) with i >= j) and each off-diagonal tile is written twice,
   as itself and transposed at (j, i): half the multiply-adds of a plain GEMM.
   It serves both ``A = X X^T`` (alpha=1, no Z) and ``B = c A A^T + b A``
   (Y = Z = A), the ``b A`` term being fused into the epilogue.
2. ``_axpby_mm_kernel`` computes ``a X + B X`` with the ``a X`` term fused into
   the epilogue of the ``B X`` GEMM.

Accumulation is fp32 whatever the input dtype (bf16, fp16 or fp32); A, B and X
are stored in the input dtype between kernels, as the PyTorch reference does.
The batch offset is computed in int64: a [320, 2560, 3072] batch has 2.5e9
elements, past int32.

Legend: Bt batch, n rows (n <= m after newton_schulz transposes tall inputs),
m columns.

On CUDA the tile sizes are autotuned per (n, m). CPU tensors run the same
kernels through Triton's interpreter (``TRITON_INTERPRET=1`` semantics, used by
the tests) with one small tile configuration; the interpreter mis-computes bf16
dot products, so test it in fp32.
"""

from __future__ import annotations

from typing import Sequence

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # optim stays importable without triton; newton_schulz falls back to torch
    triton = None
    tl = None
    TRITON_AVAILABLE = False

__all__ = ["TRITON_AVAILABLE", "ns_iterate_triton"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


if TRITON_AVAILABLE:

    def _sym_mm_kernel(
        Y, Z, Out,
        n, k,
        stride_yb, stride_yr, stride_yc,
        stride_zb, stride_zr, stride_zc,
        stride_ob, stride_or, stride_oc,
        alpha, beta,
        HAS_Z: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Out = alpha * Y Y^T (+ beta * Z), lower-triangle tiles only, mirrored."""
        # Tile t of the lower triangle, numbered row by row, sits at (i, j) with
        # t = i (i + 1) / 2 + j. Invert with a float sqrt and fix rounding either way.
        t = tl.program_id(0)
        i = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
        i = tl.where(i * (i + 1) // 2 > t, i - 1, i)
        i = tl.where((i + 1) * (i + 2) // 2 <= t, i + 1, i)
        j = t - i * (i + 1) // 2
        batch = tl.program_id(1).to(tl.int64)
        Y += batch * stride_yb
        Out += batch * stride_ob

        rows = i * BLOCK + tl.arange(0, BLOCK)
        cols = j * BLOCK + tl.arange(0, BLOCK)
        ks = tl.arange(0, BLOCK_K)
        # Rows past n wrap around instead of being masked: the loads stay in bounds and
        # the garbage rows are dropped by the store mask. Only the K tail needs a mask.
        y_rows = Y + (rows % n)[:, None] * stride_yr + ks[None, :] * stride_yc
        y_cols_t = Y + (cols % n)[None, :] * stride_yr + ks[:, None] * stride_yc
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            a = tl.load(y_rows, mask=ks[None, :] < k - k0, other=0.0)
            b = tl.load(y_cols_t, mask=ks[:, None] < k - k0, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            y_rows += BLOCK_K * stride_yc
            y_cols_t += BLOCK_K * stride_yc
        acc = acc * alpha
        in_bounds = (rows[:, None] < n) & (cols[None, :] < n)
        if HAS_Z:
            Z += batch * stride_zb
            z = tl.load(Z + rows[:, None] * stride_zr + cols[None, :] * stride_zc, mask=in_bounds, other=0.0)
            acc += beta * z.to(tl.float32)
        out = acc.to(Out.dtype.element_ty)
        tl.store(Out + rows[:, None] * stride_or + cols[None, :] * stride_oc, out, mask=in_bounds)
        # The mirror image; a diagonal tile is its own mirror and is written once.
        if i != j:
            tl.store(Out + cols[:, None] * stride_or + rows[None, :] * stride_oc, tl.trans(out),
                     mask=(cols[:, None] < n) & (rows[None, :] < n))

    def _axpby_mm_kernel(
        Bm, X, Out,
        n, m,
        stride_bb, stride_br, stride_bc,
        stride_xb, stride_xr, stride_xc,
        stride_ob, stride_or, stride_oc,
        a,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Out = a X + Bm X with Bm [n, n] and X [n, m]."""
        pid = tl.program_id(0)
        # Grouped tile order: GROUP_M row tiles share the same X column tiles while
        # they are hot in L2.
        tiles_m = tl.cdiv(n, BLOCK_M)
        tiles_n = tl.cdiv(m, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        batch = tl.program_id(1).to(tl.int64)
        Bm += batch * stride_bb
        X += batch * stride_xb
        Out += batch * stride_ob

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        # Out-of-range rows/columns wrap (in-bounds loads, dropped at the store); only K is masked.
        b_ptrs = Bm + (rows % n)[:, None] * stride_br + ks[None, :] * stride_bc
        x_ptrs = X + ks[:, None] * stride_xr + (cols % m)[None, :] * stride_xc
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, n, BLOCK_K):
            b = tl.load(b_ptrs, mask=ks[None, :] < n - k0, other=0.0)
            x = tl.load(x_ptrs, mask=ks[:, None] < n - k0, other=0.0)
            acc = tl.dot(b, x, acc, input_precision=PRECISION)
            b_ptrs += BLOCK_K * stride_bc
            x_ptrs += BLOCK_K * stride_xr
        in_bounds = (rows[:, None] < n) & (cols[None, :] < m)
        x_tile = tl.load(X + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=in_bounds, other=0.0)
        acc += a * x_tile.to(tl.float32)
        tl.store(Out + rows[:, None] * stride_or + cols[None, :] * stride_oc,
                 acc.to(Out.dtype.element_ty), mask=in_bounds)

    # Autotune candidates with little or no register spilling on sm_90 (checked offline with cuobjdump).
    _SYM_CONFIGS = [
        triton.Config({"BLOCK": bl, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bl, bk, w, s in [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 4), (64, 64, 4, 4), (64, 32, 4, 5)]
    ]
    _AXPBY_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 8, 3), (64, 256, 64, 8, 3), (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
        ]
    ]
    # fp32 (IEEE dot products) is for checking, not speed: one small tile that compiles in seconds.
    _SYM_CONFIGS_FP32 = [triton.Config({"BLOCK": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3)]
    _AXPBY_CONFIGS_FP32 = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3)
    ]
    # The interpreter runs each program in Python: few, small tiles keep the tests quick.
    _INTERPRETER_SYM = {"BLOCK": 32, "BLOCK_K": 32}
    _INTERPRETER_AXPBY = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}

    def interpreted(*kernels):
        """The kernels wrapped for the Triton interpreter (CPU tensors); one clear error when
        TRITON_INTERPRET=1 was not set before triton's first import (its own helpers were then
        compiled for the GPU). Shared by every Triton kernel of the project."""
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.zeros, InterpretedFunction):
            raise RuntimeError(
                "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is first imported"
            )
        return tuple(InterpretedFunction(k) for k in kernels)

    _compiled: dict = {}

    def _kernels(device: torch.device, dtype: torch.dtype):
        """(sym_mm, axpby_mm, fixed meta-parameters) for tensors on ``device``."""
        kind = ("cuda", dtype == torch.float32) if device.type == "cuda" else "interpreter"
        if kind not in _compiled:
            if kind != "interpreter":
                fp32 = kind[1]
                sym = triton.autotune(_SYM_CONFIGS_FP32 if fp32 else _SYM_CONFIGS, key=["n", "k", "HAS_Z"])(
                    triton.jit(_sym_mm_kernel))
                axpby = triton.autotune(_AXPBY_CONFIGS_FP32 if fp32 else _AXPBY_CONFIGS, key=["n", "m"])(
                    triton.jit(_axpby_mm_kernel))
                _compiled[kind] = (sym, axpby, {}, {})
            else:
                _compiled[kind] = (*interpreted(_sym_mm_kernel, _axpby_mm_kernel), _INTERPRETER_SYM, _INTERPRETER_AXPBY)
        return _compiled[kind]


def _sym_mm(kernel, meta, y, out, alpha, z=None, beta=0.0, precision="tf32"):
    Bt, n, k = y.shape
    zz = z if z is not None else y  # any valid pointer; HAS_Z=False never reads it

    def grid(META):
        tiles = triton.cdiv(n, META["BLOCK"])
        return (tiles * (tiles + 1) // 2, Bt)

    kernel[grid](
        y, zz, out, n, k,
        *y.stride(), *zz.stride(), *out.stride(),
        alpha, beta,
        HAS_Z=z is not None, PRECISION=precision, **meta,
    )


def _axpby_mm(kernel, meta, bm, x, out, a, precision="tf32"):
    Bt, n, m = x.shape

    def grid(META):
        return (triton.cdiv(n, META["BLOCK_M"]) * triton.cdiv(m, META["BLOCK_N"]), Bt)

    kernel[grid](bm, x, out, n, m, *bm.stride(), *x.stride(), *out.stride(), a, PRECISION=precision, **meta)


def ns_iterate_triton(X_Bnm: torch.Tensor, coeffs: Sequence[tuple[float, float, float]]) -> torch.Tensor:
    """Run ``A = X X^T; B = b A + c A A; X = a X + B X`` once per (a, b, c) in ``coeffs``.

    ``X_Bnm`` must already be normalised (spectral norm <= 1), batched 3-D
    [Bt, n, m] and in the compute dtype (bf16, fp16 or fp32); wide (n <= m) is
    what makes it cheap, since the n x n products are the small ones. Returns a
    new tensor of the same shape and dtype; the input is not modified. CUDA
    tensors run compiled kernels; CPU tensors run them in Triton's interpreter.
    """
    if X_Bnm.dim() != 3:
        raise ValueError(f"ns_iterate_triton expects a 3-D [batch, n, m] tensor, got shape {tuple(X_Bnm.shape)}")
    if X_Bnm.dtype not in _DTYPES:
        raise ValueError(f"ns_iterate_triton dtype={X_Bnm.dtype}; valid: float32, float16, bfloat16")
    coeffs = [tuple(float(v) for v in abc) for abc in coeffs]
    if any(len(abc) != 3 for abc in coeffs):
        raise ValueError(f"ns_iterate_triton coeffs must be (a, b, c) triples, got {coeffs}")
    X = X_Bnm.contiguous()
    if not coeffs or X.numel() == 0:
        return X.clone()
    Bt, n, m = X.shape
    sym, axpby, sym_meta, axpby_meta = _kernels(X.device, X.dtype)
    # fp32 on CUDA would silently drop to TF32 otherwise; the reference does not.
    precision = "ieee" if X.dtype == torch.float32 else "tf32"
    A = torch.empty(Bt, n, n, device=X.device, dtype=X.dtype)
    B = torch.empty_like(A)
    # Two ping-pong buffers for X; the caller's tensor is only ever read.
    buffers = [torch.empty_like(X), torch.empty_like(X) if len(coeffs) > 1 else None]
    for step, (a, b, c) in enumerate(coeffs):
        X_next = buffers[step % 2]
        _sym_mm(sym, sym_meta, X, A, 1.0, precision=precision)
        _sym_mm(sym, sym_meta, A, B, c, z=A, beta=b, precision=precision)
        _axpby_mm(axpby, axpby_meta, B, X, X_next, a, precision=precision)
        X = X_next
    return X


if not TRITON_AVAILABLE:
    # Without triton, importing ns_iterate_triton by name fails with ImportError, the signal its
    # callers already treat as "no Triton kernel here"; TRITON_AVAILABLE stays importable.
    del ns_iterate_triton
    __all__ = ["TRITON_AVAILABLE"]
