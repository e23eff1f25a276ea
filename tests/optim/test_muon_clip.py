"""MuonClip end to end with the plain MHA module of optim.protocol's docstring."""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kimi_train.parallel.spawn import spawn
from optim import Muon, MuonClip, QKClipTarget, muon_param_groups


class Attention(nn.Module):
    """Plain causal multi-head attention implementing optim.protocol.QKClipAttention."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.max_logits = None

    def qk_clip_target(self):
        return QKClipTarget(kind="mha", w_q=self.q_proj.weight, w_k=self.k_proj.weight, num_heads=self.num_heads)

    def reset_max_logits(self):
        self.max_logits = None

    def forward(self, x_BTD):
        B, T, _ = x_BTD.shape
        q, k, v = (p(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        causal_TT = torch.ones(T, T, dtype=torch.bool, device=x_BTD.device).tril()
        s_BHTT = (q @ k.mT) * self.head_dim**-0.5
        s_BHTT = s_BHTT.masked_fill(~causal_TT, float("-inf"))
        with torch.no_grad():
            m_H = s_BHTT.amax(dim=(0, 2, 3)).float()
            self.max_logits = m_H if self.max_logits is None else torch.maximum(self.max_logits, m_H)
        y = (s_BHTT.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        return x_BTD + self.o_proj(y)


class TinyLM(nn.Module):
    def __init__(self, vocab=32, dim=32, heads=4, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Attention(dim, heads) for _ in range(layers))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids_BT):
        x = self.embed(ids_BT)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def _loss(model, ids_BT):
    logits = model(ids_BT[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), ids_BT[:, 1:].flatten())


def test_muonclip_caps_logits_end_to_end():
    torch.manual_seed(0)
    model = TinyLM()
    tau = 3.0
    opt = MuonClip(muon_param_groups(model), attention_layers=list(model.layers), tau=tau, lr=0.05, ns_backend="torch")
    ids = torch.randint(0, 32, (4, 16))
    clipped_total = 0
    for _ in range(8):
        opt.zero_grad()
        _loss(model, ids).backward()
        recorded = [layer.max_logits.clone() for layer in model.layers]
        opt.step()
        stats = opt.last_stats
        assert all(layer.max_logits is None for layer in model.layers)  # records reset
        assert stats["max_logit_per_layer"] == [float(r.max()) for r in recorded]
        assert stats["max_logit"] == max(stats["max_logit_per_layer"])
        assert stats["clipped_heads_per_layer"] == [int((r > tau).sum()) for r in recorded]
        assert stats["clipped_heads"] == sum(stats["clipped_heads_per_layer"])
        clipped_total += stats["clipped_heads"]
    assert clipped_total > 0

    # A step with lr = 0 only clips: re-running the same batch gives exactly tau on the
    # clipped heads of the first layer (its input does not depend on attention weights).
    opt_clip_only = MuonClip(muon_param_groups(model), attention_layers=list(model.layers), tau=tau, lr=0.0)
    opt_clip_only.zero_grad()
    _loss(model, ids).backward()
    before_H = model.layers[0].max_logits.clone()
    opt_clip_only.step()
    with torch.no_grad():
        model(ids[:, :-1])
    after_H = model.layers[0].max_logits
    over_H = before_H > tau
    assert over_H.any()
    torch.testing.assert_close(after_H[over_H], torch.full_like(after_H[over_H], tau), rtol=1e-5, atol=0)
    assert torch.equal(after_H[~over_H], before_H[~over_H])


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in model.parameters()]
    return params, state


def _assert_same(a, b):
    for x, y in zip(a[0], b[0], strict=True):
        assert torch.equal(x, y)
    for sx, sy in zip(a[1], b[1], strict=True):
        assert sx.keys() == sy.keys()
        for k in sx:
            assert torch.equal(sx[k], sy[k]) if torch.is_tensor(sx[k]) else sx[k] == sy[k]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "shape"])
def test_a_bad_record_changes_nothing(bad):
    """All or nothing: step() checks every layer's record before the Muon update, so a NaN/Inf
    (or misshapen) record raises and leaves every parameter and optimizer state bit-identical."""
    from optim import NonFiniteMaxLogit

    torch.manual_seed(0)
    model = TinyLM()
    opt = MuonClip(muon_param_groups(model), attention_layers=list(model.layers), tau=1e-3, lr=0.05,
                   ns_backend="torch")
    ids = torch.randint(0, 32, (2, 8))
    for _ in range(2):  # non-zero momentum and AdamW moments to protect
        opt.zero_grad()
        _loss(model, ids).backward()
        opt.step()
    opt.zero_grad()
    _loss(model, ids).backward()
    if bad == "shape":
        model.layers[1].max_logits = torch.zeros(3)
    else:
        model.layers[1].max_logits[2] = bad
    before = _snapshot(model, opt)
    error = ValueError if bad == "shape" else NonFiniteMaxLogit
    with pytest.raises(error, match=r"attention_layers\[1\]"):
        opt.step()
    _assert_same(before, _snapshot(model, opt))
    assert model.layers[0].max_logits is not None  # records kept for the caller


def test_qk_clip_with_max_logits_the_caller_measured():
    """qk_clip_(max_logits): the primitive for clip variants outside step(). Heads over tau get
    exactly tau on the measured batch, the others are untouched, the layers' own records are
    ignored (and reset: they describe the weights before the clip), and last_stats is not changed."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = MuonClip(muon_param_groups(model), attention_layers=list(model.layers), tau=0.5, lr=0.0)
    ids = torch.randint(0, 32, (4, 16))
    with torch.no_grad():
        model(ids[:, :-1])
    measured = [layer.max_logits.clone() for layer in model.layers]
    for layer in model.layers:
        layer.max_logits = torch.full_like(layer.max_logits, 1e6)  # must not be used
    stats = opt.qk_clip_([measured[0], None])  # clip layer 0 only
    assert stats["max_logit_per_layer"] == [float(measured[0].max()), -math.inf]
    assert stats["clipped_heads_per_layer"] == [int((measured[0] > 0.5).sum()), 0] and stats["clipped_heads"] > 0
    assert opt.last_stats["clipped_heads"] == 0
    assert all(layer.max_logits is None for layer in model.layers)
    with torch.no_grad():
        model(ids[:, :-1])
    after_H, over_H = model.layers[0].max_logits, measured[0] > 0.5
    torch.testing.assert_close(after_H[over_H], torch.full_like(after_H[over_H], 0.5), rtol=1e-5, atol=0)
    assert torch.equal(after_H[~over_H], measured[0][~over_H])
    with pytest.raises(ValueError, match="1 max-logit entries for 2 attention layers"):
        opt.qk_clip_([measured[0]])


def test_no_layers_is_plain_muon_and_no_record_means_no_clip():
    torch.manual_seed(0)
    a, b = TinyLM(), TinyLM()
    b.load_state_dict(a.state_dict())
    opt_a = MuonClip(muon_param_groups(a), attention_layers=None, lr=0.05)
    opt_b = Muon(muon_param_groups(b), lr=0.05)
    ids = torch.randint(0, 32, (2, 8))
    for model, opt in ((a, opt_a), (b, opt_b)):
        for _ in range(3):
            opt.zero_grad()
            _loss(model, ids).backward()
            opt.step()
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)
    assert opt_a.last_stats == {"max_logit": -math.inf, "max_logit_per_layer": [], "clipped_heads": 0,
                                "clipped_heads_per_layer": []}

    for layer in a.layers:
        layer.reset_max_logits()  # plain Muon never resets them
    opt = MuonClip(muon_param_groups(a), attention_layers=list(a.layers), tau=1e-3)
    for p in a.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # no forward since the last step: nothing recorded, nothing clipped
    assert opt.last_stats["max_logit_per_layer"] == [-math.inf, -math.inf] and opt.last_stats["clipped_heads"] == 0


def test_nan_logit_names_the_layer():
    model = TinyLM()
    opt = MuonClip(muon_param_groups(model), attention_layers=list(model.layers))
    model.layers[1].max_logits = torch.tensor([1.0, math.nan, 0.0, 0.0])
    model.layers[0].max_logits = torch.zeros(4)
    with pytest.raises(ValueError, match=r"attention_layers\[1\].*non-finite"):
        opt.step()


def test_bad_args():
    model = TinyLM()
    with pytest.raises(ValueError, match="tau"):
        MuonClip(muon_param_groups(model), attention_layers=list(model.layers), tau=0.0)
    with pytest.raises(ValueError, match=r"attention_layers\[0\] \(Linear\)"):
        MuonClip(muon_param_groups(model), attention_layers=[model.lm_head])
    with pytest.raises(ValueError, match="not initialised"):
        opt = MuonClip(muon_param_groups(model), attention_layers=list(model.layers), process_group=object())
        opt.qk_clip_()


def _two_rank_worker(rank, world):
    torch.manual_seed(0)
    layer = Attention(8, 2)  # same weights on both ranks
    opt = MuonClip([layer.q_proj.weight, layer.k_proj.weight], attention_layers=[layer], tau=10.0, lr=0.0)
    # rank 0 saw head 0 at 40, rank 1 saw head 1 at 20: both must clip both heads
    layer.max_logits = torch.tensor([40.0, 5.0]) if rank == 0 else torch.tensor([1.0, 20.0])
    for p in (layer.q_proj.weight, layer.k_proj.weight):
        p.grad = torch.zeros_like(p)
    opt.step()
    result = {"step": (opt.last_stats, layer.q_proj.weight.detach().clone(), layer.k_proj.weight.detach().clone())}
    # caller-measured max logits: rank 1 measured nothing, rank 0 head 1 over tau; the
    # collective still lines up and both ranks clip the same head with the same gamma
    stats = opt.qk_clip_([torch.tensor([5.0, 40.0]) if rank == 0 else None])
    result["re"] = (stats, layer.q_proj.weight.detach().clone())
    # a NaN on one rank only must not vanish in the MAX reduce: every rank refuses the clip
    layer.max_logits = torch.tensor([float("nan"), 1.0]) if rank == 1 else torch.tensor([5.0, 1.0])
    try:
        opt.qk_clip_()
        result["nan"] = "no error"
    except ValueError as e:
        result["nan"] = str(e)
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    return result


def test_max_reduced_across_ranks():
    results = spawn(_two_rank_worker, 2)
    (s0, q0, k0), (s1, q1, k1) = results[0]["step"], results[1]["step"]
    results_re = results[0]["re"], results[1]["re"]
    nan_errors = results[0]["nan"], results[1]["nan"]
    assert all("no error" != e for e in nan_errors), nan_errors
    assert s0 == s1 and s0["max_logit_per_layer"] == [40.0] and s0["clipped_heads"] == 2
    assert torch.equal(q0, q1) and torch.equal(k0, k1)
    (r0, rq0), (r1, rq1) = results_re
    assert r0 == r1 and r0["max_logit_per_layer"] == [40.0]
    assert r0["clipped_heads"] == 1 and torch.equal(rq0, rq1)
    expected_rq = q0.view(2, 4, 8) * torch.tensor([1.0, 0.25]).sqrt()[:, None, None]
    torch.testing.assert_close(rq0, expected_rq.reshape(8, 8))
    torch.manual_seed(0)
    ref = Attention(8, 2)
    expected_q = ref.q_proj.weight.detach().view(2, 4, 8) * torch.tensor([0.25, 0.5]).sqrt()[:, None, None]
    torch.testing.assert_close(q0, expected_q.reshape(8, 8))


def test_prepare_then_step_then_finish_is_step():
    """The two phases an engine drives: prepare (reduce, check, decide; nothing written), the
    step (which writes the decision), finish. Equal to step() alone; a prepared decision is the
    one applied (step does not read the records again); finish(applied=False) clips nothing."""
    torch.manual_seed(0)
    models = [TinyLM(), TinyLM()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [MuonClip(muon_param_groups(m), attention_layers=list(m.layers), tau=0.3, lr=0.02, ns_dtype=torch.float32,
                     ns_backend="torch") for m in models]
    ids = torch.randint(0, 32, (4, 16))
    for m in models:
        _loss(m, ids).backward()
    opts[0].step()
    before = [p.detach().clone() for p in models[1].parameters()]
    opts[1].prepare_qk_clip()
    assert all(torch.equal(a, p) for a, p in zip(before, models[1].parameters()))  # nothing written
    for layer in models[1].layers:
        layer.max_logits = torch.full_like(layer.max_logits, 1e6)  # after prepare: must not be used
    opts[1].step()
    assert opts[1].last_stats == opts[0].last_stats and opts[0].last_stats["clipped_heads"] > 0
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    # dropped after prepare: the records are reset, nothing is clipped, the stats say so
    _loss(models[1], ids).backward()
    opts[1].prepare_qk_clip()
    before = [p.detach().clone() for p in models[1].parameters()]
    stats = opts[1].finish_qk_clip(applied=False)
    assert stats["clipped_heads"] == 0 and stats["max_logit"] > 0.3
    assert all(layer.max_logits is None for layer in models[1].layers)
    assert all(torch.equal(a, p) for a, p in zip(before, models[1].parameters()))
