"""MoE: router rules, grouped experts vs the per-expert loop, aux-loss-free bias update."""

import pytest
import torch

from kimi_train.kernels.grouped_gemm import resolve_backend
from kimi_train.model import GroupedExperts, MoE, load_model_config, update_expert_bias
from kimi_train.model.moe import Router
from kimi_train.parallel.spawn import spawn


def _cfg(**kw):
    base = dict(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)
    return load_model_config("tiny", **{**base, **kw})


def test_router_bias_selects_but_does_not_weight():
    torch.manual_seed(0)
    router = Router(_cfg(routed_scaling_factor=2.5))
    router.init_weights(0.5)
    x = torch.randn(64, 32)
    scores = torch.sigmoid(x @ router.weight.T)
    with torch.no_grad():
        router.e_score_correction_bias[3] = 10.0  # expert 3 always chosen
    w, idx = router(x)
    assert (idx == 3).any(dim=1).all()
    picked = scores.gather(1, idx)
    torch.testing.assert_close(w, picked / picked.sum(1, keepdim=True) * 2.5)  # unbiased scores
    torch.testing.assert_close(w.sum(1), torch.full((64,), 2.5))


def test_router_unnormalised_and_group_limited():
    torch.manual_seed(1)
    router = Router(_cfg(n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=False))
    router.init_weights(0.5)
    with torch.no_grad():  # negative bias: scores + bias < 0, so a 0-mask would not exclude a group
        router.e_score_correction_bias.fill_(-5.0)
    x = torch.randn(50, 32)
    w, idx = router(x)
    choice = torch.sigmoid(x @ router.weight.T) - 5.0
    group_score = choice.view(50, 4, 2).topk(2, dim=-1).values.sum(-1)
    allowed = group_score.topk(2, dim=-1).indices  # [T, 2] groups
    assert ((idx // 2)[:, :, None] == allowed[:, None, :]).any(-1).all()
    expected = choice.masked_fill(~torch.zeros(50, 4, dtype=torch.bool).scatter(1, allowed, True).repeat_interleave(2, 1),
                                  float("-inf")).topk(3, dim=-1).indices  # fmt: skip
    assert torch.equal(idx.sort(1).values, expected.sort(1).values)
    torch.testing.assert_close(w, torch.sigmoid(x @ router.weight.T).gather(1, idx))


def _loop_experts(experts, x_SD, counts):
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x_SD[start : start + n]
        h = torch.nn.functional.silu(xe @ experts.gate_proj[e].T) * (xe @ experts.up_proj[e].T)
        out.append(h @ experts.down_proj[e].T)
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("backend", ["auto", "loop"])
@pytest.mark.parametrize("reduce", ["sum", "weighted"])
def test_grouped_experts_equal_per_expert_loop_with_empty_experts(backend, reduce):
    torch.manual_seed(2)
    experts = GroupedExperts(6, 32, 16)  # fp32 rows of 128/64 bytes: torch grouped_mm path on CPU
    experts.init_weights(0.3, 0.3)
    counts = torch.tensor([3, 0, 5, 0, 0, 4])  # experts 1, 3, 4 get no tokens
    x = torch.randn(12, 32, requires_grad=True)
    if backend == "auto" and hasattr(torch.nn.functional, "grouped_mm"):  # the path the model takes on CPU
        offs = counts.cumsum(0).int()
        assert resolve_backend(x, experts.gate_proj.transpose(-2, -1), offs) == "torch"
    y = experts(x, counts, backend=backend)
    g_out = torch.ones_like(y) if reduce == "sum" else torch.randn_like(y)
    (y.sum() if reduce == "sum" else (y * g_out).sum()).backward()  # y.sum(): zero-stride grad
    grads = [x.grad.clone()] + [p.grad.clone() for p in experts.parameters()]
    x.grad = None
    experts.zero_grad()
    y_ref = _loop_experts(experts, x, counts)
    (y_ref * g_out).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, [x.grad] + [p.grad for p in experts.parameters()]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for p in experts.parameters():  # experts without tokens: exactly zero gradient
        assert p.grad is not None and torch.equal(p.grad[[1, 3, 4]], torch.zeros_like(p.grad[[1, 3, 4]]))


def test_moe_layer_equals_dense_reference_and_counts_tokens():
    torch.manual_seed(3)
    moe = MoE(_cfg(n_shared_experts=2))
    moe.init_weights(0.3, 0.3)
    x = torch.randn(2, 7, 32, requires_grad=True)
    y = moe(x)
    w, idx = moe.gate(x.view(-1, 32))
    ref = moe.shared_experts(x.view(-1, 32))
    E = moe.experts
    for t in range(14):
        for j in range(2):
            e = idx[t, j]
            h = torch.nn.functional.silu(x.view(-1, 32)[t] @ E.gate_proj[e].T) * (x.view(-1, 32)[t] @ E.up_proj[e].T)
            ref = ref.index_add(0, torch.tensor([t]), (w[t, j] * (h @ E.down_proj[e].T))[None])
    torch.testing.assert_close(y.view(-1, 32), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(moe.routed_counts(), torch.bincount(idx.flatten(), minlength=8).float())
    moe.eval()(x)  # eval forwards are not counted
    assert moe.routed_counts().sum() == 28


def test_update_expert_bias_sign_rule_mean_zero_and_reset():
    layers = [MoE(_cfg()), MoE(_cfg())]
    layers[0].tokens_per_expert.copy_(torch.tensor([10.0, 0, 4, 4, 4, 4, 4, 2]))  # mean 4
    with torch.no_grad():
        layers[1].gate.e_score_correction_bias.copy_(torch.arange(8.0))
    stats = update_expert_bias(layers, rate=0.01)
    b0 = layers[0].gate.e_score_correction_bias
    sign = torch.tensor([-1.0, 1, 0, 0, 0, 0, 0, 1])
    torch.testing.assert_close(b0, 0.01 * (sign - sign.mean()))
    assert abs(b0.mean().item()) < 1e-7
    torch.testing.assert_close(layers[1].gate.e_score_correction_bias, torch.arange(8.0) - 3.5)  # no tokens: recentred
    assert stats["imbalance_per_layer"] == [2.5, 0.0] and stats["max_imbalance"] == 2.5
    assert all(torch.equal(m.tokens_per_expert, torch.zeros(8)) for m in layers)


def _worker(rank, world):
    from kimi_train.parallel.engine import balance_experts

    moe = MoE(_cfg(n_routed_experts=4))
    # Rank 0 sends its tokens to expert 0, rank 1 to expert 1: only the sum looks balanced.
    moe.tokens_per_expert.copy_(torch.tensor([6.0, 0, 1, 1]) if rank == 0 else torch.tensor([0.0, 6, 1, 1]))
    balance_experts([moe], rate=1.0)  # the engines' update: counts summed over the ranks
    return moe.gate.e_score_correction_bias.detach().clone()


def test_balance_experts_sums_the_counts_over_ranks():
    biases = spawn(_worker, 2)
    # Global counts [6, 6, 2, 2], mean 4 -> sign [-1, -1, 1, 1] on both ranks.
    for bias in biases:
        torch.testing.assert_close(bias, torch.tensor([-1.0, -1, 1, 1]))


def test_shared_experts_run_while_the_routed_output_is_in_flight():
    """Expert parallelism returns the routed output with its combine all_to_all in flight (an
    AsyncCollectiveTensor, waited at first use): the MoE must compute its shared experts before
    it reads that output, or there is nothing to overlap the combine with. Same result."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    torch.manual_seed(0)
    moe = MoE(_cfg(n_shared_experts=1))
    moe.init_weights(0.5, 0.5)
    x = torch.randn(2, 5, 32)
    want = moe(x)
    routed, seen = [], []
    forward = moe.experts.forward
    moe.experts.forward = lambda *a, **k: routed.append(AsyncCollectiveTensor(forward(*a, **k))) or routed[-1]
    moe.shared_experts.register_forward_pre_hook(lambda *_: seen.append(routed[-1].completed if routed else None))
    torch.testing.assert_close(moe(x), want)
    assert seen == [False] and routed[-1].completed  # shared experts ran before the first wait
