"""Activation checkpointing (parallel.activation_checkpoint) on one process: the same gradients and
statistics as no checkpointing, less memory, names unchanged, and a recomputation that replays
the stored ops instead of re-running them (the max-logit op, the router's top-k)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kimi_train.memory.counter import count_activations
from kimi_train.model import KimiForCausalLM, load_model_config
from kimi_train.parallel.activation_checkpoint import apply_activation_checkpointing

MODES = [("selective", False), ("selective", True), ("full", False)]


def _model(mode="none", down=False, **overrides):
    shape = dict(num_hidden_layers=3, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 max_logits_chunk=16)
    cfg = load_model_config("tiny", **{**shape, **overrides})
    torch.manual_seed(0)
    model = KimiForCausalLM(cfg)
    return apply_activation_checkpointing(model, mode, down).train()


def _step(model, ids):
    """Two micro-batches (the second forward finds a record already there), then the records."""
    for mb in ids.chunk(2):
        model(mb[:, :-1]).float().logsumexp(-1).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(len(a._records) == 2 for a in model.attention_layers())  # one per forward
    return grads, [a.max_logits.clone() for a in model.attention_layers()], [m.routed_counts().clone() for m in model.moe_layers()]


@pytest.mark.parametrize("mode,down", MODES)
def test_same_gradients_max_logits_and_exact_counts(mode, down):
    ids = torch.randint(0, 256, (4, 33))
    want_g, want_m, want_c = _step(_model(), ids)
    model = _model(mode, down)
    assert [n for n, _ in model.named_parameters()] == list(want_g)  # no wrapper in the names
    got_g, got_m, got_c = _step(model, ids)
    for n, g in want_g.items():
        torch.testing.assert_close(got_g[n], g, rtol=1e-6, atol=1e-6 * float(g.abs().max()), msg=lambda m: f"{n}: {m}")
    for got, want in zip(got_m, want_m):
        assert torch.equal(got, want)
    for got, want in zip(got_c, want_c):  # the counts of the two forwards, not of their recomputations too
        assert torch.equal(got, want) and got.sum() == 4 * 32 * model.config.num_experts_per_tok


class _OpCensus(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode,down", MODES)
def test_the_backward_replays_stored_ops(mode, down):
    """The O(T^2) max-logit op and the router's top-k are stored, never run again in the backward;
    the up-projections run again under selective, the norms' rsqrt under both."""
    model = _model(mode, down)
    loss = model(torch.randint(0, 256, (2, 32))).float().logsumexp(-1).mean()
    with _OpCensus() as census:
        loss.backward()
    assert "per_head_max_logits" not in census.ops and "topk" not in census.ops
    assert "rsqrt" in census.ops
    assert all(a.max_logits is not None for a in model.attention_layers())


def test_memory_per_mode():
    """Counted per MoE layer (seq 128): the issue's bounds hold with margin at this scale too."""
    cfg_kw = dict(hidden_size=128, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=32, qk_rope_head_dim=16,
                  v_head_dim=32, moe_intermediate_size=64)
    counted = {}
    for mode, down in [("none", False), *MODES]:
        model = _model(mode, down, **cfg_kw)
        layer = model.model.layers[1]
        cos, sin = model.model.rotary_emb(torch.arange(128), torch.float32)
        count = count_activations(layer, torch.randn(2, 128, 128), cos, sin)
        counted[(mode, down)] = count.bytes
        # A backward's recomputation stops early, inside a module: the next forward keeps the same.
        layer(torch.randn(2, 128, 128, requires_grad=True), cos, sin).sum().backward()
        assert count_activations(layer, torch.randn(2, 128, 128), cos, sin).bytes == count.bytes, (mode, down)
        if mode == "selective":  # the MLA up-projections' outputs (H * (N + R) = 192, H * (N + V) = 256) are not kept
            assert not [s for s in count.storages if s.op == "mm" and s.shape[-1] in (192, 256)], count.storages
    none = counted[("none", False)]
    assert counted[("selective", False)] <= 0.6 * none
    assert counted[("selective", True)] < counted[("selective", False)]  # the down projection's output
    assert counted[("full", False)] <= 0.2 * none


def test_bad_mode_is_one_line():
    with pytest.raises(ValueError, match="train.activation_checkpointing='some'; valid: none, selective, full"):
        apply_activation_checkpointing(_model(), "some")
