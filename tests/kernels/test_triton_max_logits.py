"""Per-head max-logit kernel against a brute-force [B, H, T, T] computation (interpreter on CPU, fp32)."""

import pytest
import torch

pytest.importorskip("triton")

from kimi_train.kernels.max_logits_triton import _split_head_dim, max_logits_triton  # noqa: E402
from kimi_train.model.max_logits import per_head_max_logits  # noqa: E402


def _brute_force(q_BHTD, k_BHTD, scale):
    H, Hkv, T = q_BHTD.shape[1], k_BHTD.shape[1], q_BHTD.shape[2]
    k_BHTD = k_BHTD.repeat_interleave(H // Hkv, dim=1)
    s = (q_BHTD.double() @ k_BHTD.double().mT) * scale
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return s.masked_fill(~causal, float("-inf")).amax(dim=(0, 2, 3)).float()


@pytest.mark.parametrize(
    "B,H,Hkv,T,D",
    [
        (2, 2, 2, 37, 192),  # MLA head dim (128 + 64), T not a block multiple, B > 1
        (1, 4, 2, 50, 64),  # GQA, 2 query heads per KV head
        (2, 3, 1, 17, 24),  # MQA, head dim below a power of two
        (1, 2, 2, 1, 8),  # one token
    ],
)
def test_matches_brute_force(interpreter, B, H, Hkv, T, D):
    g = torch.Generator().manual_seed(B * 100 + T)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    torch.testing.assert_close(max_logits_triton(q, k, D**-0.5), _brute_force(q, k, D**-0.5), atol=1e-5, rtol=1e-5)


def test_causal_signed_and_strided(interpreter):
    B, T, H, D = 2, 40, 2, 32
    g = torch.Generator().manual_seed(7)
    # The attention layout [B, T, H, D] transposed: non-contiguous q and k.
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    # A huge logit in the future (query 3, key 30) must not count; one in the past must.
    q[0, 0, 3] = 10.0
    k[0, 0, 30] = 10.0
    k[1, 1, 2] = -q[1, 1, 35] * 50  # a hugely negative visible logit does not win either
    got = max_logits_triton(q, k, 0.125)
    torch.testing.assert_close(got, _brute_force(q, k, 0.125), atol=1e-5, rtol=1e-5)
    assert got[0] < 0.125 * 10.0 * 10.0 * D
    # Signed: with every logit negative the max is negative.
    neg = max_logits_triton(-torch.ones(1, 1, 20, 16), torch.ones(1, 1, 20, 16), 0.25)
    assert neg.item() == -4.0


def test_model_dispatch_uses_kernel(interpreter):
    q, k = torch.randn(1, 4, 33, 48), torch.randn(1, 2, 33, 48)
    got = per_head_max_logits(q, k, 0.1, backend="triton")
    torch.testing.assert_close(got, per_head_max_logits(q, k, 0.1, chunk_size=8, backend="torch"))


def test_batch_max_over_sequences_and_empty_batch(interpreter):
    q, k = torch.randn(3, 4, 33, 48), torch.randn(3, 2, 33, 48)
    q[1, 1:] *= 3  # different sequences hold different heads' maxima
    q[2, 0] *= 3
    torch.testing.assert_close(max_logits_triton(q, k, 0.1), _brute_force(q, k, 0.1), atol=1e-5, rtol=1e-5)
    assert torch.equal(max_logits_triton(q[:0], k[:0], 0.1), torch.full((4,), float("-inf")))


def test_split_head_dim():
    assert _split_head_dim(192) == (128, 64)
    assert _split_head_dim(128) == (128, 0)
    assert _split_head_dim(80) == (64, 16)
    assert _split_head_dim(100) == (64, 64)
    assert _split_head_dim(8) == (16, 0)


def test_errors():
    q = torch.randn(1, 3, 8, 16)
    with pytest.raises(ValueError, match="divisible"):
        max_logits_triton(q, torch.randn(1, 2, 8, 16), 1.0)
    with pytest.raises(ValueError, match="softmax_scale"):
        max_logits_triton(q, q, 0.0)
    with pytest.raises(ValueError, match="expects q"):
        max_logits_triton(q[0], q, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("H,Hkv,T,D", [(16, 16, 4096, 192), (32, 8, 2048, 128), (8, 8, 1000, 192)])
def test_gpu_bf16(H, Hkv, T, D):
    q = torch.randn(2, H, T, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
    got = max_logits_triton(q, k, D**-0.5)
    want = per_head_max_logits(q.float(), k.float(), D**-0.5, backend="torch")
    # bf16 inputs are exact in fp32; only the accumulation order differs.
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(per_head_max_logits(q, k, D**-0.5), want, atol=1e-2, rtol=1e-3)  # "auto": the kernel
