"""Triton grouped GEMM for the routed experts, forward and backward.

Legend: T tokens (sorted by expert), K input features, N output features,
E experts. ``offs_E`` holds int32 cumulative END offsets: expert e owns rows
[offs[e-1], offs[e]) (offs[-1] == T); empty experts have offs[e] == offs[e-1].

    forward   y_TN[rows_e]  = x_TK[rows_e] @ w_EKN[e]
    backward  dx_TK[rows_e] = dy_TN[rows_e] @ w_EKN[e]^T      (same kernel, W transposed view)
              dw_EKN[e]     = x_TK[rows_e]^T @ dy_TN[rows_e]   (reduction over the expert's rows)

The row-blocked kernel (forward and dx) is persistent: a fixed grid of programs
walks the experts in order and takes every NUM_PROGRAMS-th output tile, so the
ragged group sizes are read on the device and never synchronised to the host.
The dw kernel gives each (expert, K tile, N tile) one program that loops over
the expert's rows; an empty expert writes a zero gradient.

fp32 accumulation for bf16/fp16/fp32 inputs; row offsets in int64 (T * K can
pass 2^31 at K2 sizes). CPU tensors run in Triton's interpreter
(TRITON_INTERPRET=1 must be set before triton is imported), used by the tests.
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

__all__ = ["TRITON_AVAILABLE", "grouped_gemm_triton"]


if TRITON_AVAILABLE:

    def _grouped_rows_kernel(
        X, W, Ends, Out,
        E, K, N,
        stride_xt, stride_xk,
        stride_we, stride_wk, stride_wn,
        stride_ot, stride_on,
        NUM_PROGRAMS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Out[rows_e] = X[rows_e] @ W[e] for every expert e, persistent over tiles."""
        tile = tl.program_id(0)
        tiles_n = (N + BLOCK_N - 1) // BLOCK_N
        seen = 0  # output tiles of the experts before g
        start = 0
        for g in range(E):
            end = tl.load(Ends + g)
            tiles_g = ((end - start + BLOCK_M - 1) // BLOCK_M) * tiles_n
            while tile < seen + tiles_g:
                local = tile - seen
                rows = start + (local // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
                cols = (local % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
                row_ok = rows < end
                rows64 = rows.to(tl.int64)
                w_g = W + tl.cast(g, tl.int64) * stride_we
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    x = tl.load(X + rows64[:, None] * stride_xt + ks[None, :] * stride_xk,
                                mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)
                    w = tl.load(w_g + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                                mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
                    acc = tl.dot(x, w, acc, input_precision=PRECISION)
                tl.store(Out + rows64[:, None] * stride_ot + cols[None, :] * stride_on,
                         acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))
                tile += NUM_PROGRAMS
            seen += tiles_g
            start = end

    def _grouped_dw_kernel(
        X, DY, Starts, Ends, DW,
        K, N,
        stride_xt, stride_xk,
        stride_dyt, stride_dyn,
        stride_we, stride_wk, stride_wn,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """DW[e] = X[rows_e]^T @ DY[rows_e]; program (K tile x N tile, expert)."""
        pid = tl.program_id(0)
        g = tl.program_id(1)
        tiles_n = (N + BLOCK_N - 1) // BLOCK_N
        ks = (pid // tiles_n) * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(Starts + g)
        end = tl.load(Ends + g)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            row_ok = rows < end
            rows64 = rows.to(tl.int64)
            x_t = tl.load(X + rows64[None, :] * stride_xt + ks[:, None] * stride_xk,
                          mask=row_ok[None, :] & (ks[:, None] < K), other=0.0)
            dy = tl.load(DY + rows64[:, None] * stride_dyt + cols[None, :] * stride_dyn,
                         mask=row_ok[:, None] & (cols[None, :] < N), other=0.0)
            acc = tl.dot(x_t, dy, acc, input_precision=PRECISION)
        dw = DW + tl.cast(g, tl.int64) * stride_we
        tl.store(dw + ks[:, None] * stride_wk + cols[None, :] * stride_wn, acc.to(DW.dtype.element_ty),
                 mask=(ks[:, None] < K) & (cols[None, :] < N))

    _ROWS_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3)
        ]
    ]
    _DW_CONFIGS = [
        triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "BLOCK_T": bt}, num_warps=w, num_stages=s)
        for bk, bn, bt, w, s in [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
    ]
    # fp32 (IEEE dot products) is for checking, not speed: one small tile that compiles in seconds.
    _ROWS_CONFIGS_FP32 = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3)]
    _DW_CONFIGS_FP32 = [triton.Config({"BLOCK_K": 64, "BLOCK_N": 64, "BLOCK_T": 32}, num_warps=4, num_stages=3)]
    _INTERPRETER_ROWS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "NUM_PROGRAMS": 4}
    _INTERPRETER_DW = {"BLOCK_K": 32, "BLOCK_N": 32, "BLOCK_T": 16}
    _compiled: dict = {}

    def _kernels(device: torch.device, dtype: torch.dtype):
        kind = ("cuda", dtype == torch.float32) if device.type == "cuda" else "interpreter"
        if kind not in _compiled:
            if kind != "interpreter":
                fp32 = kind[1]
                sms = torch.cuda.get_device_properties(device).multi_processor_count
                rows = triton.autotune(_ROWS_CONFIGS_FP32 if fp32 else _ROWS_CONFIGS, key=["K", "N", "E"])(
                    triton.jit(_grouped_rows_kernel))
                dw = triton.autotune(_DW_CONFIGS_FP32 if fp32 else _DW_CONFIGS, key=["K", "N"])(
                    triton.jit(_grouped_dw_kernel))
                _compiled[kind] = (rows, dw, {"NUM_PROGRAMS": 2 * sms}, {})
            else:
                from optim.triton_ns import interpreted

                _compiled[kind] = (*interpreted(_grouped_rows_kernel, _grouped_dw_kernel), _INTERPRETER_ROWS, _INTERPRETER_DW)
        return _compiled[kind]


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs on CUDA would otherwise go through TF32; the reference does not.
    return "ieee" if dtype == torch.float32 else "tf32"


def _grouped_rows(x_TK: torch.Tensor, w_EKN: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    T, K = x_TK.shape
    E, _, N = w_EKN.shape
    out_TN = torch.empty(T, N, device=x_TK.device, dtype=x_TK.dtype)
    if T == 0 or N == 0 or E == 0:
        return out_TN
    rows, _, meta, _ = _kernels(x_TK.device, x_TK.dtype)
    grid = (meta["NUM_PROGRAMS"],)
    rows[grid](
        x_TK, w_EKN, ends_E, out_TN, E, K, N,
        *x_TK.stride(), *w_EKN.stride(), *out_TN.stride(),
        PRECISION=_precision(x_TK.dtype), **meta,
    )
    return out_TN


def _grouped_dw(x_TK: torch.Tensor, dy_TN: torch.Tensor, ends_E: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    K, N, E = x_TK.shape[1], dy_TN.shape[1], ends_E.shape[0]
    dw_EKN = torch.empty(E, K, N, device=x_TK.device, dtype=dtype)
    if E == 0 or K == 0 or N == 0:
        return dw_EKN
    starts_E = torch.cat([ends_E.new_zeros(1), ends_E[:-1]])
    _, dw, _, meta = _kernels(x_TK.device, x_TK.dtype)

    def grid(META):
        return (triton.cdiv(K, META["BLOCK_K"]) * triton.cdiv(N, META["BLOCK_N"]), E)

    dw[grid](
        x_TK, dy_TN, starts_E, ends_E, dw_EKN, K, N,
        *x_TK.stride(), *dy_TN.stride(), *dw_EKN.stride(),
        PRECISION=_precision(x_TK.dtype), **meta,
    )
    return dw_EKN


class _GroupedGemmTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TK, w_EKN, ends_E):
        ctx.save_for_backward(x_TK, w_EKN, ends_E)
        return _grouped_rows(x_TK, w_EKN, ends_E)

    @staticmethod
    def backward(ctx, dy_TN):
        x_TK, w_EKN, ends_E = ctx.saved_tensors
        dx_TK = dw_EKN = None
        if ctx.needs_input_grad[0]:
            dx_TK = _grouped_rows(dy_TN, w_EKN.transpose(1, 2), ends_E)
        if ctx.needs_input_grad[1]:
            dw_EKN = _grouped_dw(x_TK, dy_TN, ends_E, w_EKN.dtype)
        return dx_TK, dw_EKN, None


def grouped_gemm_triton(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """y[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e], differentiable in x and w.

    x_TK [T, K] with rows sorted by expert; w_EKN [E, K, N] (any strides, e.g.
    the [E, N, K] expert weight transposed); offs_E int cumulative ends with
    offs[-1] == T (rows past offs[-1] are left unwritten, as in torch's grouped_mm).
    """
    if x_TK.dim() != 2 or w_EKN.dim() != 3 or offs_E.dim() != 1:
        raise ValueError(
            f"grouped_gemm_triton expects x [T, K], w [E, K, N], offs [E]; got {tuple(x_TK.shape)}, "
            f"{tuple(w_EKN.shape)}, {tuple(offs_E.shape)}"
        )
    if x_TK.shape[1] != w_EKN.shape[1] or offs_E.shape[0] != w_EKN.shape[0]:
        raise ValueError(
            f"grouped_gemm_triton shape mismatch: x {tuple(x_TK.shape)}, w {tuple(w_EKN.shape)}, "
            f"offs {tuple(offs_E.shape)}"
        )
    if x_TK.dtype != w_EKN.dtype:
        raise ValueError(f"grouped_gemm_triton dtypes differ: x {x_TK.dtype}, w {w_EKN.dtype}")
    return _GroupedGemmTriton.apply(x_TK, w_EKN, offs_E.to(torch.int32))


if not TRITON_AVAILABLE:
    # Without triton, importing grouped_gemm_triton by name fails with ImportError, the signal its
    # callers already treat as "no Triton kernel here"; TRITON_AVAILABLE stays importable.
    del grouped_gemm_triton
    __all__ = ["TRITON_AVAILABLE"]
