"""MuonClip end to end with the plain MHA module of optim.protocol's docstring."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

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


def _clip_one_step(model, ids, tau, remeasure, passes=1):
    opt = MuonClip(muon_param_groups(model), attention_layers=list(model.layers), tau=tau, lr=0.2, ns_backend="torch")
    opt.zero_grad()
    _loss(model, ids).backward()
    seen = [layer.max_logits.clone() for layer in model.layers]
    if remeasure:
        opt.step(remeasure=lambda: model(ids[:, :-1]), remeasure_passes=passes)
    else:
        opt.step()
    assert all(layer.max_logits is None for layer in model.layers)
    with torch.no_grad():
        model(ids[:, :-1])  # the updated, clipped weights on the step's own batch
    after = [layer.max_logits.clone() for layer in model.layers]
    return opt.last_stats, seen, after


def test_remeasure_clips_the_updated_weights_to_exactly_tau():
    """K2's order clips with the pre-update max logits, so the clipped heads of layer 0
    come out well over tau on their own batch at lr 0.2. step(remeasure=...) re-runs the batch after the
    update and clips with those values: layer 0's clipped heads give exactly tau."""
    torch.manual_seed(0)
    base = TinyLM()
    ids = torch.randint(0, 32, (4, 16))
    tau = 0.6
    results = {}
    for remeasure, passes in ((False, 0), (True, 1), (True, 2)):
        model = TinyLM()
        model.load_state_dict(base.state_dict())
        results[passes] = _clip_one_step(model, ids, tau, remeasure, passes)

    stats_k2, seen_k2, after_k2 = results[0]
    assert max(float(after_k2[0].max()), float(after_k2[1].max())) > 1.05 * tau  # the gap remeasure closes

    stats, seen, after = results[1]
    assert [torch.equal(a, b) for a, b in zip(seen, seen_k2)] == [True, True]
    assert stats["max_logit_per_layer"] == [float(r.max()) for r in seen]  # the step's forward, as without it
    assert stats["clipped_heads"] > 0 and stats["clipped_heads"] == sum(stats["clipped_heads_per_layer"])
    remeasured = stats["max_logit_remeasured_per_layer"]
    assert stats["max_logit_remeasured"] == max(remeasured) > tau
    over0 = after[0] >= tau * (1 - 1e-6)
    assert int(over0.sum()) == stats["clipped_heads_per_layer"][0] > 0
    torch.testing.assert_close(after[0][over0], torch.full_like(after[0][over0], tau), rtol=1e-5, atol=0)
    # layer 1 was clipped on its old input; layer 0's clip moved that input: a second pass fixes it
    assert float(after[1].max()) > 1.02 * tau
    stats2, _, after2 = results[2]
    assert stats2 == stats  # the first pass's max logits; no head went over tau only in the second
    torch.testing.assert_close(after2[0], after[0], rtol=1e-6, atol=0)
    assert float(after2[1].max()) == pytest.approx(tau, rel=1e-5)


def test_measure_and_clip_before_a_forward_bounds_that_forward():
    """Called before a step on the batch that step will train on (the trainer's lookahead), the
    clip bounds the step's own forward: its recorded max logits are at most tau, with the clipped
    heads of the first layer on tau (the second layer needs the second pass). Without it,
    K2's order lets the same forward go over tau."""
    torch.manual_seed(0)
    base = TinyLM()
    batches = [torch.randint(0, 32, (4, 16)) for _ in range(6)]
    tau = 0.6
    maxima = {}
    for lookahead in (False, True):
        model = TinyLM()
        model.load_state_dict(base.state_dict())
        opt = MuonClip(muon_param_groups(model), attention_layers=list(model.layers), tau=tau, lr=0.2,
                       ns_backend="torch")
        maxima[lookahead] = []
        for ids in batches:
            if lookahead:
                measured = opt.measure_and_clip_(lambda: model(ids[:, :-1]), passes=2)
                assert set(measured) == {"max_logit", "max_logit_per_layer", "clipped_heads", "clipped_heads_per_layer",
                                         "clipped_heads_mask_per_layer"}
                assert measured["clipped_heads_per_layer"] == [sum(m) for m in measured["clipped_heads_mask_per_layer"]]
            opt.zero_grad()
            _loss(model, ids).backward()
            forward_L = [layer.max_logits.clone() for layer in model.layers]
            maxima[lookahead].append(max(float(m.max()) for m in forward_L))
            if lookahead and measured["clipped_heads_per_layer"][0]:
                over0 = forward_L[0] >= tau * (1 - 1e-6)
                assert int(over0.sum()) >= 1
                torch.testing.assert_close(forward_L[0][over0], torch.full_like(forward_L[0][over0], tau),
                                           rtol=1e-5, atol=0)
            opt.step()
    assert max(maxima[False][1:]) > 1.05 * tau  # what the lookahead removes
    assert max(maxima[True]) <= tau * (1 + 1e-5)
    assert any(m == pytest.approx(tau, rel=1e-5) for m in maxima[True])  # it did clip

    with pytest.raises(ValueError, match="passes=0"):
        opt.measure_and_clip_(lambda: None, passes=0)
    with pytest.raises(RuntimeError, match="recorded no max logits"):
        opt.measure_and_clip_(lambda: None)
    # allowed when asked: nothing recorded, nothing clipped, last_stats untouched
    before = dict(opt.last_stats)
    quiet = opt.measure_and_clip_(lambda: None, require_record=False)
    assert quiet["clipped_heads"] == 0 and quiet["max_logit"] == -math.inf
    assert quiet["clipped_heads_mask_per_layer"] == [[False] * 4, [False] * 4]
    assert opt.last_stats == before


def test_step_with_remeasure_and_no_forward_at_all_is_not_an_error():
    """A step whose own forward recorded nothing (no forward since the last step) may re-measure
    nothing too: no error, no clip (require_record=False inside step)."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = MuonClip(muon_param_groups(model), attention_layers=list(model.layers), tau=1e-3, lr=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(remeasure=lambda: None)
    assert opt.last_stats["clipped_heads"] == 0 and opt.last_stats["max_logit_remeasured"] == -math.inf
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_non_finite_pass_clips_nothing_and_reports_the_earlier_passes():
    """measure_and_clip_: a NaN in pass 2 raises NonFiniteMaxLogit before that pass touches any
    layer, even the ones before the NaN; pass 1's clip stays and is in the exception's stats. A
    head exactly at tau is not over it."""
    from optim import NonFiniteMaxLogit

    torch.manual_seed(0)
    model = TinyLM()
    opt = MuonClip(muon_param_groups(model), attention_layers=list(model.layers), tau=10.0, lr=0.0)
    a, b = model.layers
    records = iter([(torch.tensor([40.0, 10.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])),
                    (torch.tensor([20.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, math.nan, 1.0, 1.0]))])

    def measure():
        a.max_logits, b.max_logits = next(records)

    weights = lambda: [p.detach().clone() for p in model.parameters()]  # noqa: E731
    before = weights()
    with pytest.raises(NonFiniteMaxLogit, match=r"attention_layers\[1\]\]: non-finite max logit nan at head 1") as err:
        opt.measure_and_clip_(measure, passes=2)
    assert err.value.stats["clipped_heads_mask_per_layer"] == [[True, False, False, False], [False] * 4]
    assert err.value.stats["max_logit_per_layer"] == [40.0, 1.0]
    # only pass 1's clip of layer 0 head 0 (gamma 1/4): pass 2 would have clipped it again
    changed = [not torch.equal(x, y) for x, y in zip(before, weights())]
    assert changed == [False, True, True, False, False, False, False, False, False, False]
    torch.testing.assert_close(a.q_proj.weight[:8], before[1][:8] * 0.5)
    assert all(layer.max_logits is None for layer in model.layers)
    # a pass whose only record is non-finite in the first pass: stats None
    a.max_logits = None
    with pytest.raises(NonFiniteMaxLogit) as err:
        opt.measure_and_clip_(lambda: setattr(a, "max_logits", torch.tensor([math.inf, 1.0, 1.0, 1.0])))
    assert err.value.stats is None


def test_union_clipped_counts_each_head_once():
    from optim import union_clipped

    assert union_clipped([[True, False], [False, False]], [[True, True], [False, True]]) == [[True, True], [False, True]]
    with pytest.raises(ValueError, match="masks of"):
        union_clipped([[True]], [[True, False]])


def test_remeasure_counts_each_head_clipped_in_any_pass_once():
    """Pass 1 finds head 0 over tau; the clip of an earlier layer could push head 1 over in pass 2:
    both are counted, head 0 once although it is over in both passes (recorded values stand in
    for the forwards)."""
    torch.manual_seed(0)
    layer = Attention(8, 2)
    opt = MuonClip([layer.q_proj.weight, layer.k_proj.weight], attention_layers=[layer], tau=10.0, lr=0.0)
    for p in (layer.q_proj.weight, layer.k_proj.weight):
        p.grad = torch.zeros_like(p)
    layer.max_logits = torch.tensor([3.0, 4.0])
    records = iter([torch.tensor([40.0, 5.0]), torch.tensor([12.0, 20.0])])

    def remeasure():
        layer.max_logits = next(records)

    q_before = layer.q_proj.weight.detach().clone()
    opt.step(remeasure=remeasure, remeasure_passes=2)
    stats = opt.last_stats
    assert stats["max_logit_per_layer"] == [4.0] and stats["max_logit_remeasured_per_layer"] == [40.0]
    assert stats["clipped_heads_per_layer"] == [2] and stats["clipped_heads"] == 2
    assert stats["clipped_heads_mask_per_layer"] == [[True, True]]
    gamma = torch.tensor([10 / 40 * 10 / 12, 10 / 20])  # head 0 clipped twice, head 1 once
    expected = q_before.view(2, 4, 8) * gamma.sqrt()[:, None, None]
    torch.testing.assert_close(layer.q_proj.weight.detach(), expected.reshape(8, 8))


def test_remeasure_misuse_and_nan_are_errors():
    torch.manual_seed(0)
    model = TinyLM()
    opt = MuonClip(muon_param_groups(model), attention_layers=list(model.layers), tau=1.0, lr=0.05)
    ids = torch.randint(0, 32, (2, 8))
    _loss(model, ids).backward()
    for bad in (0, True, 1.0):
        with pytest.raises(ValueError, match=f"remeasure_passes={bad!r}"):
            opt.step(remeasure=lambda: None, remeasure_passes=bad)
    with pytest.raises(RuntimeError, match=r"the re-measure recorded no max logits; remeasure\(\) \(step\)"):
        opt.step(remeasure=lambda: None)
    # a NaN in the step's own forward is refused as plain step() refuses it, not logged and passed over
    _loss(model, ids).backward()
    model.layers[1].max_logits[2] = math.nan
    with pytest.raises(ValueError, match=r"attention_layers\[1\]\]: non-finite max logit nan at head 2"):
        opt.step(remeasure=lambda: model(ids[:, :-1]))


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
                                "clipped_heads_per_layer": [], "clipped_heads_mask_per_layer": []}

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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        layer = Attention(8, 2)  # same weights on both ranks
        opt = MuonClip([layer.q_proj.weight, layer.k_proj.weight], attention_layers=[layer], tau=10.0, lr=0.0)
        # rank 0 saw head 0 at 40, rank 1 saw head 1 at 20: both must clip both heads
        layer.max_logits = torch.tensor([40.0, 5.0]) if rank == 0 else torch.tensor([1.0, 20.0])
        for p in (layer.q_proj.weight, layer.k_proj.weight):
            p.grad = torch.zeros_like(p)
        opt.step()
        results[rank] = (opt.last_stats, layer.q_proj.weight.detach().clone(), layer.k_proj.weight.detach().clone())
        # remeasure: rank 1's re-measure records nothing, rank 0's records head 1 over tau; the
        # collectives still line up and both ranks clip the same head with the same gamma
        layer.max_logits = torch.tensor([3.0, 4.0])
        def remeasure():
            if rank == 0:
                layer.max_logits = torch.tensor([5.0, 40.0])
        opt.step(remeasure=remeasure)
        results[f"re{rank}"] = (opt.last_stats, layer.q_proj.weight.detach().clone())
        # a NaN on one rank only must not vanish in the MAX reduce: every rank refuses the clip
        layer.max_logits = torch.tensor([float("nan"), 1.0]) if rank == 1 else torch.tensor([5.0, 1.0])
        try:
            opt.qk_clip_()
            results[f"nan{rank}"] = "no error"
        except ValueError as e:
            results[f"nan{rank}"] = str(e)
        dist.barrier()  # neither rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


def test_max_reduced_across_ranks():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_two_rank_worker, args=(rank, port, results)) for rank in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        (s0, q0, k0), (s1, q1, k1) = results[0], results[1]
        results_re = results["re0"], results["re1"]
        nan_errors = results["nan0"], results["nan1"]
    assert all("no error" != e for e in nan_errors), nan_errors
    assert s0 == s1 and s0["max_logit_per_layer"] == [40.0] and s0["clipped_heads"] == 2
    assert torch.equal(q0, q1) and torch.equal(k0, k1)
    (r0, rq0), (r1, rq1) = results_re
    assert r0 == r1 and r0["max_logit_per_layer"] == [4.0] and r0["max_logit_remeasured"] == 40.0
    assert r0["clipped_heads"] == 1 and torch.equal(rq0, rq1)
    expected_rq = q0.view(2, 4, 8) * torch.tensor([1.0, 0.25]).sqrt()[:, None, None]
    torch.testing.assert_close(rq0, expected_rq.reshape(8, 8))
    torch.manual_seed(0)
    ref = Attention(8, 2)
    expected_q = ref.q_proj.weight.detach().view(2, 4, 8) * torch.tensor([0.25, 0.5]).sqrt()[:, None, None]
    torch.testing.assert_close(q0, expected_q.reshape(8, 8))
