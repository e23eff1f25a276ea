"""Grouped GEMM for the routed experts: one matmul per expert over its contiguous token block.

Legend: T tokens (sorted by expert), K input features, N output features, E experts.
``offs_E`` is int32, the cumulative END offset of each expert's block (offs[-1] == T).

Backends (all differentiable in x and w):

- ``"loop"``: one ``x_e @ w[e]`` per expert, the reference every other path is tested against.
- ``"torch"``: ``torch.nn.functional.grouped_mm`` (forward and its own backward). Its
  backward rejects a zero-stride (expanded) gradient, e.g. from ``y.sum()``, so the
  gradient is made contiguous first.
- ``"triton"``: kimi_train.kernels.grouped_gemm_triton (forward, dx and dw in Triton).
- ``"auto"``: a fixed rule, the same on every rank and every step: "torch" where grouped_mm's
  constraints hold, else "triton" on CUDA, else "loop". grouped_mm measured faster than the
  Triton kernel at every expert shape of the H200 runs (docs/kernels.md); a faster kernel
  takes over by changing this rule, with the benchmark as the evidence.

The environment variable ``KIMI_TRAIN_GROUPED_GEMM`` (loop | torch | triton) overrides
"auto" everywhere, e.g. to run the Triton kernel in training.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "loop", "torch", "triton")
_ENV_VAR = "KIMI_TRAIN_GROUPED_GEMM"


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


def _default_backend(x_TK: torch.Tensor, w_EKN: torch.Tensor) -> str:
    """grouped_mm (the faster one on an H200, see docs/kernels.md), else the Triton kernel on
    CUDA (fp32), else the loop."""
    if _grouped_mm_ok(x_TK, w_EKN):
        return "torch"
    return "triton" if _triton_usable(x_TK) else "loop"


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
    return _default_backend(x_TK, w_EKN)


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
