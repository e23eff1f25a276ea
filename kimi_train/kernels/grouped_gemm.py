"""Grouped GEMM for the routed experts: one matmul per expert over its contiguous token block.

Legend: T tokens (sorted by expert), K input features, N output features, E experts.
``offs_E`` is int32, the cumulative END offset of each expert's block (offs[-1] == T).

Backends (all differentiable in x and w):

- ``"loop"``: one ``x_e @ w[e]`` per expert, the reference every other path is tested against.
- ``"torch"``: ``torch.nn.functional.grouped_mm`` (forward and its own backward). Its
  backward rejects a zero-stride (expanded) gradient, e.g. from ``y.sum()``, so the
  gradient is made contiguous first.
- ``"triton"``: kimi_train.kernels.grouped_gemm_triton (forward, dx and dw in Triton).
- ``"auto"``: on CUDA, whichever of "triton" and "torch" runs the forward faster at
  this shape, timed once per shape and cached; on CPU, "torch" where grouped_mm's
  stride constraints hold, else "loop".

The environment variable ``KIMI_TRAIN_GROUPED_GEMM`` (loop | torch | triton) overrides
"auto" everywhere, e.g. to turn the Triton path off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "loop", "torch", "triton")
_ENV_VAR = "KIMI_TRAIN_GROUPED_GEMM"
_auto_choice: dict[tuple, str] = {}  # shape key -> measured fastest backend on CUDA


def grouped_gemm_reference(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Per-expert loop: the reference every other path is tested against."""
    outs, start = [], 0
    for e, end in enumerate(offs_E.tolist()):
        outs.append(x_TK[start:end] @ w_EKN[e])
        start = end
    if not outs:
        return x_TK.new_zeros(x_TK.shape[0], w_EKN.shape[-1])
    return torch.cat(outs, dim=0)


def _grouped_mm_ok(x_TK: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    # torch's grouped_mm wants 16-byte aligned strides and (on CUDA) bf16 on sm80+.
    if not hasattr(F, "grouped_mm"):
        return False
    if x_TK.is_cuda and x_TK.dtype != torch.bfloat16:
        return False
    if torch.compiler.is_compiling() and x_TK.dtype != torch.bfloat16:
        return False  # torch.compile's shape rule for grouped_mm accepts bf16 only, on every device
    itemsize = x_TK.element_size()
    return (x_TK.shape[-1] * itemsize) % 16 == 0 and (w_EKN.shape[-1] * itemsize) % 16 == 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (grouped_mm's backward needs one)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        return dy.contiguous()


def _grouped_mm_torch(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    y_TN = F.grouped_mm(x_TK, w_EKN, offs=offs_E.to(torch.int32))
    return _ContiguousGrad.apply(y_TN) if torch.is_grad_enabled() and y_TN.requires_grad else y_TN


def _triton_usable(x_TK: torch.Tensor) -> bool:
    if not x_TK.is_cuda:
        return False
    try:
        from kimi_train.kernels.grouped_gemm_triton import TRITON_AVAILABLE
    except ImportError:
        return False
    return TRITON_AVAILABLE


def _time_backend_ms(backend: str, x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor,
                     reps: int = 3) -> float:
    """Forward time of one backend at this shape (CUDA events, after one warm-up call)."""
    if backend == "triton":
        from kimi_train.kernels.grouped_gemm_triton import grouped_gemm_triton as run
    else:
        run = _grouped_mm_torch
    with torch.no_grad():
        x_TK, w_EKN = x_TK.detach(), w_EKN.detach()
        run(x_TK, w_EKN, offs_E)  # warm-up; also compiles and autotunes the Triton kernel for this shape
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run(x_TK, w_EKN, offs_E)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _pick_cuda_backend(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> str:
    triton_ok, torch_ok = _triton_usable(x_TK), _grouped_mm_ok(x_TK, w_EKN)
    if not (triton_ok and torch_ok):
        return "triton" if triton_ok else ("torch" if torch_ok else "loop")
    T, K = x_TK.shape
    E, _, N = w_EKN.shape
    # T changes from step to step with the routing: bucket it to a power of two.
    key = (K, N, E, x_TK.dtype, 1 << max(T - 1, 0).bit_length(), x_TK.device.index)
    if key in _auto_choice:
        return _auto_choice[key]
    if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return "torch"  # cannot time here; do not cache, a later eager call will measure
    times = {}
    for name in ("torch", "triton"):
        try:
            times[name] = _time_backend_ms(name, x_TK, w_EKN, offs_E)
        except Exception:  # e.g. grouped_mm unsupported on this GPU generation
            times[name] = float("inf")
    _auto_choice[key] = min(times, key=times.get) if min(times.values()) < float("inf") else "loop"
    return _auto_choice[key]


def resolve_backend(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor, backend: str = "auto") -> str:
    """The concrete backend ("loop" | "torch" | "triton") that ``grouped_gemm`` would run."""
    if backend not in BACKENDS:
        raise ValueError(f"grouped_gemm backend={backend!r}; valid: {', '.join(map(repr, BACKENDS))}")
    if backend == "auto":
        backend = os.environ.get(_ENV_VAR, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{_ENV_VAR}={backend!r}; valid: {', '.join(map(repr, BACKENDS))}")
    if backend != "auto":
        return backend
    if x_TK.is_cuda:
        return _pick_cuda_backend(x_TK, w_EKN, offs_E)
    return "torch" if _grouped_mm_ok(x_TK, w_EKN) else "loop"


def grouped_gemm(
    x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """y[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]. Differentiable in x and w.

    x_TK [T, K] sorted by expert; w_EKN [E, K, N] (the [E, out, in] expert weight
    transposed); offs_E int cumulative ends, offs[-1] == T. backend: "auto" | "loop" |
    "torch" | "triton" (see the module docstring).
    """
    backend = resolve_backend(x_TK, w_EKN, offs_E, backend)
    if backend == "loop":
        return grouped_gemm_reference(x_TK, w_EKN, offs_E)
    if backend == "torch":
        return _grouped_mm_torch(x_TK, w_EKN, offs_E)
    try:
        from kimi_train.kernels.grouped_gemm_triton import grouped_gemm_triton
    except ImportError:
        raise RuntimeError("grouped_gemm backend='triton' needs triton; use 'torch' or 'loop'") from None
    return grouped_gemm_triton(x_TK, w_EKN, offs_E)
