"""Compile every Triton kernel for an H100/H200 (sm_90) without a GPU, as the GPU would at launch.

Run by test_sm90_compile.py in a subprocess WITHOUT TRITON_INTERPRET (compilation
needs the real JIT). Catches what the interpreter cannot: Triton type errors,
loop-carried type changes, unsupported ops, layout and register allocation failures.
Contiguous last-dim strides are compiled as the constant 1, as Triton specialises them.
Prints one line per kernel and exits non-zero on any failure.
"""

import inspect
import sys
import warnings

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kimi_train.kernels import grouped_gemm_triton as gg
from kimi_train.kernels import max_logits_triton as ml
from optim import triton_ns as ns

FLOAT_ARGS = {"alpha", "beta", "a", "qk_scale", "scale"}
UNIT_STRIDES = {"stride_yc", "stride_zc", "stride_oc", "stride_bc", "stride_xc", "stride_xk", "stride_on", "stride_wk",
                "stride_dyn", "stride_wn", "stride_qd", "stride_kd", "sqd", "skd", "svd", "sod", "sdod"}


def compile_sm90(raw_fn, pointer_types, constexprs, num_warps, num_stages):
    signature, values = {}, dict(constexprs)
    for name in inspect.signature(raw_fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in UNIT_STRIDES:
            signature[name], values[name] = "constexpr", 1
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    src = ASTSource(fn=triton.jit(raw_fn), signature=signature, constexprs=values)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def cases():
    tf32 = {"PRECISION": "tf32"}
    c = ns._SYM_CONFIGS[0]
    yield "ns symmetric X X^T / bA + cAA", ns._sym_mm_kernel, dict(c.kwargs, HAS_Z=True, **tf32), c
    c = ns._AXPBY_CONFIGS[0]
    yield "ns aX + BX", ns._axpby_mm_kernel, dict(c.kwargs, **tf32), c
    c = gg._ROWS_CONFIGS[0]
    yield "grouped rows (fwd, dx)", gg._grouped_rows_kernel, dict(c.kwargs, NUM_PROGRAMS=264, **tf32), c
    c = gg._DW_CONFIGS[0]
    yield "grouped dw", gg._grouped_dw_kernel, dict(c.kwargs, **tf32), c
    c = ml._CONFIGS[0]
    yield "max logits D=192", ml._max_logits_kernel, dict(c.kwargs, BLOCK_D1=128, BLOCK_D2=64, **tf32), c
    # fp32 inputs (IEEE dots) use their own small tiles; the pointer dtype is set in main().
    ieee = {"PRECISION": "ieee"}
    c = ns._SYM_CONFIGS_FP32[0]
    yield "fp32 ns symmetric", ns._sym_mm_kernel, dict(c.kwargs, HAS_Z=True, **ieee), c
    c = ns._AXPBY_CONFIGS_FP32[0]
    yield "fp32 ns aX + BX", ns._axpby_mm_kernel, dict(c.kwargs, **ieee), c
    c = gg._ROWS_CONFIGS_FP32[0]
    yield "fp32 grouped rows", gg._grouped_rows_kernel, dict(c.kwargs, NUM_PROGRAMS=264, **ieee), c


def main():
    warnings.filterwarnings("ignore")
    bf = "*bf16"
    ptrs = {n: bf for n in ("Y", "Z", "Out", "Bm", "X", "W", "DY", "DW", "Q", "Kk", "V", "O", "DO")}
    ptrs.update({n: "*i32" for n in ("Ends", "Starts")})
    ptrs.update({n: "*fp32" for n in ("Partial", "LSE", "Delta", "DK", "DV", "DQ")})
    failures = 0
    for name, fn, constexprs, config in cases():
        try:
            kernel_ptrs = ptrs
            if name.startswith("fp32"):
                kernel_ptrs = {k: ("*fp32" if v == bf else v) for k, v in kernel_ptrs.items()}
            compile_sm90(fn, kernel_ptrs, constexprs, config.num_warps, config.num_stages)
            print(f"ok   {name}")
        except Exception as e:  # report every kernel, then fail
            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
