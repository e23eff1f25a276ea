"""Grouped expert GEMM: Triton (interpreter on CPU, fp32) and torch paths against the per-expert loop."""

import pytest
import torch

pytest.importorskip("triton")

from kimi_train.kernels import grouped_gemm as gg  # noqa: E402
from kimi_train.kernels.grouped_gemm import grouped_gemm, grouped_gemm_reference, resolve_backend  # noqa: E402
from kimi_train.kernels.grouped_gemm_triton import grouped_gemm_triton  # noqa: E402


def _problem(counts, K, N, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    T, E = sum(counts), len(counts)
    x_TK = torch.randn(T, K, generator=g).to(device, dtype).requires_grad_()
    # The model's layout: weight [E, out, in], passed as its [E, in, out] transposed view.
    w_ENK = torch.randn(E, N, K, generator=g).to(device, dtype).requires_grad_()
    offs_E = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    return x_TK, w_ENK, offs_E




@pytest.mark.parametrize(
    "counts",
    [
        [7, 0, 20, 1, 0],  # ragged, empty in the middle and last
        [0, 0, 33],  # empty first experts, T not a block multiple
        [5],  # one expert
        [0, 0, 0],  # no tokens at all
    ],
)
def test_triton_forward_backward(interpreter, counts):
    K, N = 40, 24  # neither a block multiple
    x_TK, w_ENK, offs_E = _problem(counts, K, N)
    dy_TN = torch.randn(x_TK.shape[0], N)
    y = grouped_gemm_triton(x_TK, w_ENK.transpose(1, 2), offs_E)
    gx, gw = torch.autograd.grad(y, (x_TK, w_ENK), dy_TN)
    y_ref = grouped_gemm_reference(x_TK, w_ENK.transpose(1, 2), offs_E)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x_TK, w_ENK), dy_TN, allow_unused=True)
    gx_ref = torch.zeros_like(x_TK) if gx_ref is None else gx_ref
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=1e-5)
    for e, n in enumerate(counts):  # an expert without tokens gets an exactly zero gradient
        if n == 0:
            assert torch.count_nonzero(gw[e]) == 0


@pytest.mark.parametrize("backend", ["torch", "triton", "loop"])
def test_expanded_grad_and_empty_experts(request, backend):
    # y.sum() hands backward a zero-stride gradient: torch's CPU grouped_mm backward rejects it raw.
    if backend == "triton":
        request.getfixturevalue("interpreter")
    counts, K, N = [3, 0, 9, 0], 16, 32  # 16-byte aligned rows: grouped_mm accepts fp32
    x_TK, w_ENK, offs_E = _problem(counts, K, N, seed=1)
    y = grouped_gemm(x_TK, w_ENK.transpose(1, 2), offs_E, backend=backend)
    gx, gw = torch.autograd.grad(y.sum(), (x_TK, w_ENK))
    y_ref = grouped_gemm_reference(x_TK, w_ENK.transpose(1, 2), offs_E)
    gx_ref, gw_ref = torch.autograd.grad(y_ref.sum(), (x_TK, w_ENK))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=1e-5)


def test_swiglu_expert_mlp_matches_loop(interpreter):
    # The model's use: gate/up/down through grouped_gemm, gradients through all three.
    counts, H, I = [4, 0, 11, 2], 24, 20
    g = torch.Generator().manual_seed(2)
    x = torch.randn(sum(counts), H, generator=g, requires_grad=True)
    w = [(torch.randn(len(counts), *shape, generator=g) * shape[1] ** -0.5).requires_grad_()
         for shape in ((I, H), (I, H), (H, I))]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)

    def mlp(backend):
        gate = grouped_gemm(x, w[0].transpose(1, 2), offs, backend=backend)
        up = grouped_gemm(x, w[1].transpose(1, 2), offs, backend=backend)
        y = grouped_gemm(torch.nn.functional.silu(gate) * up, w[2].transpose(1, 2), offs, backend=backend)
        return (y, *torch.autograd.grad(y.square().sum(), (x, *w)))

    for got, want in zip(mlp("triton"), mlp("loop")):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_resolve_backend_cpu(monkeypatch):
    x, w, offs = torch.randn(4, 16), torch.randn(2, 16, 8), torch.tensor([1, 4], dtype=torch.int32)
    monkeypatch.delenv("KIMI_TRAIN_GROUPED_GEMM", raising=False)
    assert resolve_backend(x, w, offs) == "torch"  # 64-byte rows: grouped_mm's constraints hold
    assert resolve_backend(torch.randn(4, 3), torch.randn(2, 3, 5), offs) == "loop"  # 12-byte rows
    assert resolve_backend(x, w, offs, backend="triton") == "triton"
    monkeypatch.setenv("KIMI_TRAIN_GROUPED_GEMM", "loop")
    assert resolve_backend(x, w, offs) == "loop"
    monkeypatch.setenv("KIMI_TRAIN_GROUPED_GEMM", "cutlass")
    with pytest.raises(ValueError, match="KIMI_TRAIN_GROUPED_GEMM='cutlass'"):
        resolve_backend(x, w, offs)
    with pytest.raises(ValueError, match="backend='fast'"):
        grouped_gemm(x, w, offs, backend="fast")


def test_triton_argument_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        grouped_gemm_triton(torch.randn(4, 16), torch.randn(2, 8, 8), torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="dtypes differ"):
        grouped_gemm_triton(torch.randn(4, 8), torch.randn(2, 8, 8).double(), torch.tensor([1, 4]))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
def test_gpu_bf16_k2_mini_shapes(backend):
    E, H, I, T = 64, 2048, 768, 4096 * 8
    g = torch.Generator().manual_seed(0)
    counts = torch.multinomial(torch.ones(E), T, replacement=True, generator=g).bincount(minlength=E)
    counts[3] = 0  # an empty expert
    counts[5] += T - counts.sum()
    offs = counts.cumsum(0).to(torch.int32).cuda()
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16) * H**-0.5).requires_grad_()
    dy = torch.randn(T, I, device="cuda", dtype=torch.bfloat16)
    y = grouped_gemm(x, w.transpose(1, 2), offs, backend=backend)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    y_ref = grouped_gemm_reference(x.float(), w.float().transpose(1, 2), offs)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), dy.float())
    for got, want in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        assert ((got.float() - want).norm() / want.norm()) < 1e-2
    assert gg.resolve_backend(x, w.transpose(1, 2), offs, backend) in ("triton", "torch")

