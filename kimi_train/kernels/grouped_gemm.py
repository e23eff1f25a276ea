"""Grouped GEMM for the routed experts: one matmul per expert over its contiguous token block.

Legend: T tokens (sorted by expert), K input features, N output features, E experts.
``offs_E`` is int32, the cumulative END offset of each expert's block (offs[-1] == T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    itemsize = x_TK.element_size()
    return (x_TK.shape[-1] * itemsize) % 16 == 0 and (w_EKN.shape[-1] * itemsize) % 16 == 0


def grouped_gemm(
    x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """y[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]. Differentiable in x and w.

    backend: "auto" (torch grouped_mm when its constraints hold, else the loop), "torch"
    (grouped_mm), "loop" (reference).
    """
    if backend == "loop" or (backend == "auto" and not _grouped_mm_ok(x_TK, w_EKN)):
        return grouped_gemm_reference(x_TK, w_EKN, offs_E)
    if backend not in ("auto", "torch"):
        raise ValueError(f"grouped_gemm backend={backend!r}; valid: 'auto', 'torch', 'loop'")
    y_TN = F.grouped_mm(x_TK, w_EKN, offs=offs_E.to(torch.int32))
    if y_TN.requires_grad:
        # torch 2.13's CPU grouped_mm backward rejects a zero-stride (expanded) grad_output,
        # e.g. the gradient of y.sum(): hand it a dense one.
        y_TN.register_hook(lambda g: g.contiguous())
    return y_TN
