"""The chunked linear cross-entropy (kimi_train/model/loss.py) and the model's forward(input_ids, labels, position_ids).

The chunked path must give the plain path's loss and gradients (to fp32 rounding: the issue's
rtol 1e-5, atol 1e-6 * max|g|) for any chunk size, with ignored labels and tied embeddings, keep
far less for the backward, and run inside lm_head's call.
"""

import pytest
import torch
import torch.nn.functional as F

from kimi_train.memory.counter import count_activations
from kimi_train.model import KimiForCausalLM, load_model_config
from kimi_train.model.loss import IGNORE_INDEX, chunked_linear_cross_entropy, linear_cross_entropy_reference


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def _inputs(N=37, D=16, V=50, ignored=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_ND = torch.randn(N, D, generator=g, requires_grad=True)
    w_VD = torch.randn(V, D, generator=g, requires_grad=True)
    labels_N = torch.randint(0, V, (N,), generator=g)
    labels_N[torch.randperm(N, generator=g)[:ignored]] = IGNORE_INDEX
    return h_ND, w_VD, labels_N


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])  # 8 does not divide N = 37; 100 > N: one chunk
def test_loss_and_gradients_equal_the_plain_path(chunk):
    h_ND, w_VD, labels_N = _inputs()
    ref = linear_cross_entropy_reference(h_ND, w_VD, labels_N)
    ref_h, ref_w = torch.autograd.grad(3.0 * ref, (h_ND, w_VD))  # an upstream gradient that is not 1
    loss = chunked_linear_cross_entropy(h_ND, w_VD, labels_N, chunk)
    grad_h, grad_w = torch.autograd.grad(3.0 * loss, (h_ND, w_VD))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    assert_grads_close(grad_h, ref_h)
    assert_grads_close(grad_w, ref_w)
    assert grad_h[labels_N == IGNORE_INDEX].abs().max() == 0  # ignored tokens get no gradient


def _model(tie: bool, chunk: int) -> KimiForCausalLM:
    torch.manual_seed(0)
    return KimiForCausalLM(load_model_config(
        "tiny", hidden_size=64, num_hidden_layers=2, n_routed_experts=4, moe_intermediate_size=32,
        intermediate_size=96, tie_word_embeddings=tie, loss_chunk_tokens=chunk))  # fmt: skip


@pytest.mark.parametrize("tie", [False, True])
def test_the_model_loss_and_every_gradient_equal_the_plain_path(tie):
    """model(ids, labels=y) end to end: chunks of 7 tokens (N = 32) against loss_chunk_tokens=0,
    and the plain path against F.cross_entropy over the logits model(ids) returns."""
    g = torch.Generator().manual_seed(1)
    ids_BT = torch.randint(0, 256, (2, 17), generator=g)
    x_BT, y_BT = ids_BT[:, :-1], ids_BT[:, 1:].clone()
    y_BT[0, :3] = IGNORE_INDEX
    results = {}
    for chunk in (0, 7):
        model = _model(tie, chunk)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
        loss = model(x_BT, labels=y_BT)
        loss.backward()
        results[chunk] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
        if chunk == 0:
            with torch.no_grad():
                logits_BTV = model(x_BT)
            expected = F.cross_entropy(logits_BTV.flatten(0, 1), y_BT.flatten(), ignore_index=IGNORE_INDEX)
            torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)
    (plain_loss, plain_grads), (loss, grads) = results[0], results[7]
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    assert grads.keys() == plain_grads.keys() and ("lm_head.weight" in grads) != tie
    for name, grad in grads.items():
        assert_grads_close(grad, plain_grads[name])


def test_bf16_autocast_matmuls_in_bf16_and_keeps_the_loss_in_fp32():
    """Under autocast the chunked loss is the plain path's to bf16 rounding of the logits; the loss
    is fp32 and the fp32 weight gets an fp32 gradient."""
    h_ND, w_VD, labels_N = _inputs(N=64, D=32, V=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = linear_cross_entropy_reference(h_ND, w_VD, labels_N)
        loss = chunked_linear_cross_entropy(h_ND, w_VD, labels_N, 24)
    exact = linear_cross_entropy_reference(h_ND, w_VD, labels_N)  # fp32: what both approximate
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=0)
    assert abs(loss.item() - exact.item()) > 0  # the matmul really ran in bf16
    ref_h, ref_w = torch.autograd.grad(ref, (h_ND, w_VD))
    grad_h, grad_w = torch.autograd.grad(loss, (h_ND, w_VD))
    assert grad_h.dtype == grad_w.dtype == torch.float32
    for got, want in ((grad_h, ref_h), (grad_w, ref_w)):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item())


def test_chunked_loss_keeps_a_small_fraction_of_the_plain_paths_activations():
    """The logits path (final norm output -> lm_head -> loss) of 256 tokens at V = 2048: the plain
    path keeps the N x V fp32 log-softmax, the chunked one h and a logsumexp per token."""
    model = _model(False, 0)
    model.lm_head = type(model.lm_head)(64, 2048, 0)
    h_BTD = torch.randn(1, 256, 64)
    labels_BT = torch.randint(0, 2048, (1, 256))
    kept = {}
    for chunk in (0, 64):
        model.lm_head.loss_chunk_tokens = chunk
        kept[chunk] = count_activations(model.lm_head, h_BTD, labels_BT).bytes
    assert kept[0] >= 256 * 2048 * 4  # the fp32 log-softmax
    assert kept[64] <= 0.25 * kept[0]
    assert kept[64] <= 256 * (64 * 4 + 24)  # h and a few bytes per token (logsumexp, labels, targets, mask)


def test_position_ids_per_sequence_and_the_default():
    """position_ids [B, T] rotate each row by its own positions; the default is arange(T)."""
    model = _model(False, 0).eval()
    ids_BT = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    pos_T = torch.arange(12)
    with torch.no_grad():
        default = model(ids_BT)
        torch.testing.assert_close(model(ids_BT, position_ids=pos_T), default, rtol=0, atol=0)
        per_row = model(ids_BT, position_ids=torch.stack([pos_T, 3 * pos_T]))
        torch.testing.assert_close(per_row[0], default[0], rtol=0, atol=0)
        torch.testing.assert_close(per_row[1:], model(ids_BT[1:], position_ids=3 * pos_T))
        assert (per_row[1] - default[1]).abs().max() > 1e-3  # the positions were used


def test_the_rotary_default_path_is_unchanged():
    """cos/sin for arange(T) are those of the seq_len formula the model used before position_ids."""
    emb = _model(False, 0).model.rotary_emb
    cos, sin = emb(torch.arange(50), torch.float32)
    angles = torch.arange(50, dtype=torch.float32)[:, None] * emb.inv_freq[None, :]
    assert torch.equal(cos, angles.cos() * emb.attention_factor)
    assert torch.equal(sin, angles.sin() * emb.attention_factor)
