"""Kernel tests: on a machine without CUDA, Triton kernels run in its interpreter.

TRITON_INTERPRET=1 must be in the environment before triton is first imported
(triton.language's own helpers are built for one mode at import). This conftest
sets it when no GPU is present; if some earlier test module already imported
triton without it, the CPU kernel tests skip with that reason instead of failing.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_ready() -> str:
    """'' when Triton kernels can run on CPU tensors here, else why not."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return "triton is not installed"
    if not isinstance(tl.zeros, InterpretedFunction):
        if torch.cuda.is_available():
            return "CUDA present: the kernels are tested on the GPU (set TRITON_INTERPRET=1 to run these on CPU)"
        return "triton was imported before TRITON_INTERPRET=1 was set (run tests/kernels on its own)"
    return ""


@pytest.fixture
def interpreter():
    """Skip unless Triton kernels can run on CPU tensors through the interpreter."""
    reason = _interpreter_ready()
    if reason:
        pytest.skip(reason)
