"""optim.triton_ns against the PyTorch Newton-Schulz iteration (interpreter on CPU, fp32)."""

import pytest
import torch

pytest.importorskip("triton")

from optim.newton_schulz import newton_schulz, ns_coefficients  # noqa: E402
from optim.triton_ns import ns_iterate_triton  # noqa: E402


def _reference(X_Bnm, coeffs):
    for a, b, c in coeffs:
        A = X_Bnm @ X_Bnm.mT
        B = b * A + c * (A @ A)
        X_Bnm = a * X_Bnm + B @ X_Bnm
    return X_Bnm


def _normalised(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(*shape, generator=g)
    return X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + 1e-7)


@pytest.mark.parametrize("method", ["keller", "polar_express"])
@pytest.mark.parametrize("shape", [(1, 37, 53), (3, 20, 45), (2, 33, 33)])
def test_matches_reference(interpreter, method, shape):
    coeffs = ns_coefficients(method, 5)
    X = _normalised(*shape)
    torch.testing.assert_close(ns_iterate_triton(X, coeffs), _reference(X, coeffs), atol=1e-4, rtol=1e-4)


def test_many_tiles_and_single_step(interpreter):
    # 150 rows = 5 row tiles of 32 -> 15 lower-triangle tiles: exercises the tile-index inversion.
    coeffs = ns_coefficients("keller", 1)
    X = _normalised(1, 150, 160, seed=1)
    torch.testing.assert_close(ns_iterate_triton(X, coeffs), _reference(X, coeffs), atol=1e-5, rtol=1e-4)


def test_gram_matrix_is_symmetric_and_input_untouched(interpreter):
    X = _normalised(2, 40, 50, seed=2)
    X_before = X.clone()
    # a=0, b=1, c=0 makes the step X <- (X X^T) X; the symmetric product A is exercised exactly.
    out = ns_iterate_triton(X, [(0.0, 1.0, 0.0)])
    torch.testing.assert_close(out, (X @ X.mT) @ X, atol=1e-6, rtol=1e-5)
    assert torch.equal(X, X_before)
    ns_iterate_triton(X, ns_coefficients("keller", 3))  # ping-pong buffers: still never written
    assert torch.equal(X, X_before)


def test_newton_schulz_triton_backend(interpreter):
    # Through optim's public entry point: 2-D, tall (transposed inside) and batched.
    cases = ((torch.randn(24, 40), "keller"), (torch.randn(40, 24), "polar_express"),
             (torch.randn(3, 16, 48), "keller"))
    for G, method in cases:
        got = newton_schulz(G, steps=5, method=method, dtype=torch.float32, backend="triton")
        want = newton_schulz(G, steps=5, method=method, dtype=torch.float32, backend="torch")
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fp16_storage(interpreter):
    # fp16 inputs: products stored in fp16 between kernels, accumulated in fp32.
    coeffs = ns_coefficients("keller", 2)
    X = _normalised(1, 20, 36, seed=3)
    got = ns_iterate_triton(X.half(), coeffs).float()
    torch.testing.assert_close(got, _reference(X, coeffs), atol=5e-3, rtol=5e-3)


def test_errors():
    with pytest.raises(ValueError, match="3-D"):
        ns_iterate_triton(torch.randn(4, 4), [(1.0, 0.0, 0.0)])
    with pytest.raises(ValueError, match="dtype"):
        ns_iterate_triton(torch.ones(1, 4, 4, dtype=torch.int32), [(1.0, 0.0, 0.0)])
    with pytest.raises(ValueError, match="triples"):
        ns_iterate_triton(torch.randn(1, 4, 4), [(1.0, 0.0)])


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["keller", "polar_express"])
@pytest.mark.parametrize("shape", [(1, 4096, 4096), (4, 1024, 3072), (8, 1536, 7168), (2, 1000, 1700)])
def test_gpu_bf16_matches_torch(method, shape):
    coeffs = ns_coefficients(method, 5)
    X = _normalised(*shape).cuda()
    want = _reference(X.double(), coeffs).float()
    got = ns_iterate_triton(X.bfloat16(), coeffs).float()
    torch_bf16 = _reference(X.bfloat16(), coeffs).float()
    # bf16 rounding of A, B and X every step: compare errors relative to the fp64 iteration.
    err_triton = (got - want).norm() / want.norm()
    err_torch = (torch_bf16 - want).norm() / want.norm()
    assert err_triton < max(2 * err_torch, 1e-2), (err_triton.item(), err_torch.item())


@pytest.mark.gpu
def test_gpu_batch_past_int32_offsets():
    # [320, 2560, 3072] has 2.5e9 elements: the last matrix only comes out right with int64 offsets.
    X = torch.randn(320, 2560, 3072, device="cuda", dtype=torch.bfloat16)
    X /= torch.linalg.vector_norm(X.float(), dim=(-2, -1), keepdim=True).bfloat16()
    coeffs = ns_coefficients("keller", 1)
    got = ns_iterate_triton(X, coeffs)[-1].float()
    want = _reference(X[-1:].double(), coeffs)[0].float()
    assert ((got - want).norm() / want.norm()) < 1e-2
