"""EXPERIMENTAL flash attention with max-logit emission: output, max and gradients against PyTorch."""

import pytest
import torch

pytest.importorskip("triton")

from kimi_train.kernels.flash_attn_triton import flash_attention_with_max  # noqa: E402


def _reference(q, k, v, scale):
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    T = q.shape[2]
    s = (q @ k.mT) * scale
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(s, dim=-1) @ v, s.detach().amax(dim=(0, 2, 3)).float()


@pytest.mark.parametrize(
    "B,H,Hkv,T,D,Dv",
    [
        (2, 2, 2, 37, 24, 20),  # T, D and Dv not block multiples; D split 16 + 16
        (1, 4, 2, 33, 48, 32),  # GQA: dK/dV summed over the query heads of a kv head
    ],
)
def test_matches_pytorch(interpreter, B, H, Hkv, T, D, Dv):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(*shape, generator=g).requires_grad_()
               for shape in ((B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, Dv)))
    o, max_H = flash_attention_with_max(q, k, v, 0.3)
    do = torch.randn(o.shape, generator=g)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_ref, max_ref = _reference(q, k, v, 0.3)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(max_H, max_ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not max_H.requires_grad


def test_errors():
    q = torch.randn(1, 3, 8, 16)
    with pytest.raises(ValueError, match="do not fit"):
        flash_attention_with_max(q, torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))
    with pytest.raises(ValueError, match="softmax_scale"):
        flash_attention_with_max(q, q, q, -1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("H,Hkv,T,D,Dv", [(16, 16, 2048, 192, 128), (8, 2, 1000, 128, 128)])
def test_gpu_bf16(H, Hkv, T, D, Dv):
    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for shape in ((2, H, T, D), (2, Hkv, T, D), (2, Hkv, T, Dv)))
    o, max_H = flash_attention_with_max(q, k, v)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    o_ref, max_ref = _reference(qf, kf, vf, D**-0.5)
    grads_ref = torch.autograd.grad(o_ref, (qf, kf, vf), do.float())
    torch.testing.assert_close(max_H, max_ref, atol=1e-2, rtol=1e-3)
    for got, want in zip((o, *grads), (o_ref, *grads_ref)):
        assert ((got.float() - want).norm() / want.norm()) < 2e-2
