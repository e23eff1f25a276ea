"""newton_schulz: singular-value bands, update-RMS oracles, gram == standard, backends."""

import importlib

import pytest
import torch

from optim import newton_schulz

ns_mod = importlib.import_module("optim.newton_schulz")  # `optim.newton_schulz` itself is the function


def _svals(O: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(O.double())


@pytest.mark.parametrize(
    "method,lo,hi",
    [("keller", 0.6, 1.2), ("gram", 0.6, 1.2), ("polar_express", 0.8, 1.2)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_singular_value_band(method, lo, hi, dtype):
    torch.manual_seed(0)
    G = torch.randn(2, 96, 384)  # rectangular: the Gaussian's smallest singular value is well away from 0
    O = newton_schulz(G, method=method, dtype=dtype, backend="torch")
    assert O.shape == G.shape and O.dtype == dtype
    s = _svals(O)
    assert s.min() > lo and s.max() < hi, (method, s.min().item(), s.max().item())


def test_polar_express_is_tighter_than_keller():
    torch.manual_seed(0)
    G = torch.randn(128, 512, dtype=torch.float64)
    spread = {}
    for method in ("keller", "polar_express"):
        s = _svals(newton_schulz(G, method=method, dtype=torch.float64))
        spread[method] = (s - 1).abs().max().item()
    assert spread["polar_express"] < spread["keller"]


@pytest.mark.parametrize("shape,oracle", [((1024, 1024), 0.18), ((512, 2048), 0.191)])
def test_update_rms_oracle(shape, oracle):
    """SPEC: RMS of 0.2 sqrt(max(n, m)) NS5(Gaussian) is about 0.18 (1024^2), 0.191 (512x2048)."""
    torch.manual_seed(0)
    G = torch.randn(*shape)
    O = newton_schulz(G, dtype=torch.float32, backend="torch") * 0.2 * max(shape) ** 0.5
    rms = O.pow(2).mean().sqrt().item()
    assert abs(rms - oracle) < 0.006, rms


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("shape", [(3, 24, 96), (40, 160), (160, 40), (2, 32, 32)])
def test_gram_equals_standard_fp64(shape, steps):
    torch.manual_seed(steps)
    G = torch.randn(*shape, dtype=torch.float64)
    ref = newton_schulz(G, steps=steps, method="keller", dtype=torch.float64)
    got = newton_schulz(G, steps=steps, method="gram", dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_batched_iteration_equals_the_per_matrix_one(steps):
    # CUDA takes the batched branch, a CPU the per-matrix one; both must give the reference.
    torch.manual_seed(steps)
    X = torch.randn(3, 24, 40, dtype=torch.float64)
    X /= torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    coeffs = ns_mod.ns_coefficients("keller", steps)
    ref = torch.stack([_ns5_plain(x, coeffs) for x in X])
    for per_matrix in (True, False):
        got = ns_mod._ns_iterate_torch(X.clone(), coeffs, per_matrix=per_matrix)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def _ns5_plain(x, coeffs):
    for a, b, c in coeffs:
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x


def test_tall_is_transpose_of_wide_and_batch_is_per_matrix():
    torch.manual_seed(0)
    G = torch.randn(3, 20, 50, dtype=torch.float64)
    O = newton_schulz(G, dtype=torch.float64)
    torch.testing.assert_close(newton_schulz(G.mT, dtype=torch.float64), O.mT, rtol=0, atol=1e-14)
    for i in range(3):  # each matrix normalised by its own norm (scale-free up to the 1e-7 guard)
        torch.testing.assert_close(newton_schulz(G[i], dtype=torch.float64), O[i], rtol=0, atol=1e-13)
        torch.testing.assert_close(newton_schulz(G[i] * (i + 2), dtype=torch.float64), O[i], rtol=0, atol=1e-6)


def test_zero_input_gives_zero_and_input_untouched():
    G = torch.zeros(8, 16)
    assert torch.equal(newton_schulz(G, dtype=torch.float32), G)
    G = torch.randn(8, 16)
    G0 = G.clone()
    newton_schulz(G, dtype=torch.float32)
    assert torch.equal(G, G0)


def test_polar_express_coefficients_repeat_last():
    coeffs = ns_mod.ns_coefficients("polar_express", 7)
    assert tuple(coeffs[:5]) == ns_mod.POLAR_EXPRESS_COEFFS and coeffs[5] == coeffs[6] == coeffs[4]
    assert ns_mod.ns_coefficients("keller", 3) == [(3.4445, -4.7750, 2.0315)] * 3


def test_auto_is_torch_even_where_triton_is_available(monkeypatch):
    """auto never picks the Triton kernel (it measured slower on most shapes): triton is opt-in."""
    monkeypatch.setattr(ns_mod, "_triton_iterate", lambda X, coeffs: pytest.fail("auto chose the Triton kernel"))
    monkeypatch.setattr(ns_mod, "_triton_import_error", None)
    torch.manual_seed(0)
    G = torch.randn(16, 40)
    assert torch.equal(newton_schulz(G, backend="auto"), newton_schulz(G, backend="torch"))


def test_triton_backend_contract(monkeypatch):
    """backend='triton' hands the kernel a normalised, wide, 3-D, contiguous tensor in the compute dtype."""
    seen = {}

    def fake_kernel(X, coeffs):
        seen.update(shape=tuple(X.shape), dtype=X.dtype, contiguous=X.is_contiguous(), coeffs=list(coeffs),
                    norms=torch.linalg.vector_norm(X.double(), dim=(-2, -1)))
        return ns_mod._ns_iterate_torch(X, coeffs)

    monkeypatch.setattr(ns_mod, "_triton_iterate", fake_kernel)
    monkeypatch.setattr(ns_mod, "_triton_import_error", None)
    G = torch.randn(2, 48, 12)  # tall: must arrive transposed
    O = newton_schulz(G, steps=3, method="polar_express", dtype=torch.float32, backend="triton")
    assert seen["shape"] == (2, 12, 48) and seen["dtype"] == torch.float32 and seen["contiguous"]
    assert seen["coeffs"] == ns_mod.ns_coefficients("polar_express", 3)
    torch.testing.assert_close(seen["norms"], torch.full((2,), 1 / 1.02, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(O, newton_schulz(G, steps=3, method="polar_express", dtype=torch.float32, backend="torch"))


def test_triton_backend_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ns_mod, "_triton_iterate", None)
    monkeypatch.setattr(ns_mod, "_triton_import_error", ImportError("no triton here"))
    with pytest.raises(RuntimeError, match="backend='triton'"):
        newton_schulz(torch.randn(4, 8), backend="triton")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(G=torch.randn(4)), "2-D"),
        (dict(G=torch.randn(2, 2, 2, 2)), "2-D"),
        (dict(steps=0), "steps"),
        (dict(method="newton"), "method"),
        (dict(dtype=torch.int32), "dtype"),
        (dict(backend="cuda"), "backend"),
        (dict(method="gram", backend="triton"), "gram"),
    ],
)
def test_bad_args(kwargs, match):
    args = dict(G=torch.randn(4, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        newton_schulz(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["keller", "polar_express"])
def test_triton_matches_torch_on_cuda(method):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    G = torch.randn(4, 256, 1024, device="cuda")
    ref = newton_schulz(G, method=method, dtype=torch.float32, backend="torch")
    got = newton_schulz(G, method=method, dtype=torch.float32, backend="triton")
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 64, 512), (2, 96, 96), (3, 200, 40)])
def test_gram_on_cuda_equals_keller(shape):
    """The CUDA gram path (batched: one bmm per product over the whole batch, with its restart)
    computes the standard iteration; square and tall matrices included."""
    torch.manual_seed(0)
    G = torch.randn(*shape, device="cuda", dtype=torch.float64)
    ref = newton_schulz(G, method="keller", dtype=torch.float64, backend="torch")
    got = newton_schulz(G, method="gram", dtype=torch.float64, backend="torch")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    fp32 = newton_schulz(G.float(), method="gram", dtype=torch.float32, backend="torch")
    torch.testing.assert_close(fp32.double(), ref, rtol=0, atol=2e-3)
