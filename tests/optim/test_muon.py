"""optim.Muon: parity with torch.optim.Muon / AdamW, EMA factor, batching, edge cases, state."""

import io

import pytest
import torch
import torch.optim._muon as torch_muon
from torch import nn

from optim import Muon, MuonClip, muon_param_groups, newton_schulz

MU = 0.95
SHAPES = [(24, 40), (40, 24), (32, 32), (24, 40)]  # wide, tall, square, and a repeated shape (stacked)


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=g, dtype=dtype) * 0.1) for s in SHAPES]


def _grads(steps, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(steps)]


def _run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def _fp32_zeropower(grad, ns_coefficients, ns_steps, eps):
    """torch's NS with the bf16 cast removed (same maths, fp32)."""
    a, b, c = ns_coefficients
    X = grad.float()
    if grad.size(0) > grad.size(1):
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(ns_steps):
        A = X @ X.T
        X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return X.T if grad.size(0) > grad.size(1) else X


@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_fp32(monkeypatch, adjust_lr, nesterov):
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _fp32_zeropower)
    ours_p, theirs_p, grads = _params(), _params(), _grads(10)
    kw = dict(lr=0.02, momentum=MU, nesterov=nesterov, weight_decay=0.1)
    ours = Muon(ours_p, ns_dtype=torch.float32, ns_backend="torch", adjust_lr=adjust_lr, **kw)
    theirs = torch.optim.Muon(theirs_p, adjust_lr_fn=adjust_lr, **kw)
    _run(ours, ours_p, grads)
    _run(theirs, theirs_p, grads)
    for a, b in zip(ours_p, theirs_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_matches_torch_muon_bf16():
    """Both sides with NS in bf16 (torch always is). "Agree to bf16 rounding": each side's
    distance from the fp32 trajectory is bf16-sized (~2^-7 of the displacement, 10 steps),
    ours no larger than torch's, and the two differ by about sqrt(2) of that."""

    def displacement(make_opt):
        params, grads = _params(), _grads(10)
        start = [p.detach().clone() for p in params]
        _run(make_opt(params), params, grads)
        return [p.detach() - w0 for p, w0 in zip(params, start)]

    ours = displacement(lambda ps: Muon(ps, lr=0.02, ns_dtype=torch.bfloat16, ns_backend="torch"))
    theirs = displacement(lambda ps: torch.optim.Muon(ps, lr=0.02, adjust_lr_fn="match_rms_adamw"))
    exact = displacement(lambda ps: Muon(ps, lr=0.02, ns_dtype=torch.float32, ns_backend="torch"))
    for o, t, e in zip(ours, theirs, exact):
        err_ours, err_theirs = (o - e).norm() / e.norm(), (t - e).norm() / e.norm()
        assert 0 < err_theirs < 2**-6 and err_ours < 1.25 * err_theirs, (err_ours.item(), err_theirs.item())
        assert (o - t).norm() / t.norm() < 2**-6


def test_torch_ema_momentum_is_ours_times_one_minus_mu(monkeypatch):
    """torch: M' = mu M' + (1-mu) G (lerp). Ours: M = mu M + G. By induction M' = (1-mu) M
    (true at M = M' = 0; then mu (1-mu) M + (1-mu) G = (1-mu)(mu M + G)). The Nesterov inputs
    differ by the same factor: G.lerp(M', mu) = (1-mu) G + mu (1-mu) M = (1-mu)(G + mu M).
    NS divides by the Frobenius norm first, so the factor cancels in the update."""
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _fp32_zeropower)
    ours_p, theirs_p, grads = _params(), _params(), _grads(6)
    ours = Muon(ours_p, lr=0.0, weight_decay=0.0, ns_dtype=torch.float32, ns_backend="torch")
    theirs = torch.optim.Muon(theirs_p, lr=0.0, weight_decay=0.0)
    _run(ours, ours_p, grads)
    _run(theirs, theirs_p, grads)
    for p, q, g in zip(ours_p, theirs_p, grads[-1]):
        m_ours, m_theirs = ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"]
        torch.testing.assert_close(m_theirs, (1 - MU) * m_ours, rtol=1e-6, atol=1e-7)
        assert (m_theirs - m_ours).norm() > 0.5 * m_ours.norm()  # the factor is real, not rounding
        u_ours, u_theirs = g + MU * m_ours, g.lerp(m_theirs, MU)
        torch.testing.assert_close(u_theirs, (1 - MU) * u_ours, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            newton_schulz(u_theirs, dtype=torch.float32), newton_schulz(u_ours, dtype=torch.float32), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("kernel", ["fused", "foreach"])
def test_adamw_group_matches_torch_adamw(monkeypatch, kernel):
    if kernel == "foreach":  # the path CUDA and bf16 parameters take
        monkeypatch.setattr("optim.muon._fused_adamw_ok", lambda tensors: False)
    g = torch.Generator().manual_seed(0)
    shapes = [(7,), (5, 3), (11,)]
    ours_p = [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    theirs_p = [nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = Muon([{"params": ours_p, "use_muon": False}], lr=1e-2, weight_decay=0.1, adamw_betas=(0.9, 0.95), adamw_eps=1e-8)
    theirs = torch.optim.AdamW(theirs_p, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(10):
        step_grads = [torch.randn(*s, generator=g) for s in shapes]
        for p, q, gr in zip(ours_p, theirs_p, step_grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, theirs_p):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_3d_expert_weight_is_a_batch_of_matrices():
    """[E, n, m] behaves exactly like E separate [n, m] parameters (fp64, same maths)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 16, 40, generator=g, dtype=torch.float64)
    expert = nn.Parameter(w.clone())
    singles = [nn.Parameter(w[e].clone()) for e in range(3)]
    kw = dict(lr=0.05, ns_dtype=torch.float64, ns_backend="torch")
    opt3, opt2 = Muon([expert], **kw), Muon(singles, **kw)
    for _ in range(3):
        gr = torch.randn(3, 16, 40, generator=g, dtype=torch.float64)
        expert.grad = gr.clone()
        for e in range(3):
            singles[e].grad = gr[e].clone()
        opt3.step()
        opt2.step()
    torch.testing.assert_close(expert.detach(), torch.stack([s.detach() for s in singles]), rtol=0, atol=1e-12)
    # scale uses the matrix shape [n, m], not the leading expert dim
    assert opt3.state[expert]["momentum_buffer"].shape == (3, 16, 40)


def test_zero_grad_gives_zero_update():
    params = _params()
    opt = Muon(params, lr=0.1, weight_decay=0.0)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
        assert torch.isfinite(opt.state[p]["momentum_buffer"]).all()
    adamw_p = nn.Parameter(torch.ones(4))
    opt = Muon([{"params": [adamw_p], "use_muon": False}], lr=0.1, weight_decay=0.0)
    adamw_p.grad = torch.zeros(4)
    opt.step()
    assert torch.equal(adamw_p.detach(), torch.ones(4))


def test_non_finite_grad_raises_with_name_and_leaves_state_alone():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = Muon(muon_param_groups(model), lr=0.01)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    snapshot = io.BytesIO()
    torch.save(opt.state_dict(), snapshot)
    params_before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(3, 8)).sum().backward()
    model[2].weight.grad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"'2\.weight'"):
        opt.step()
    model[2].weight.grad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    for p, b in zip(model.parameters(), params_before):
        assert torch.equal(p.detach(), b)
    snapshot.seek(0)
    saved = torch.load(snapshot)
    now = opt.state_dict()
    for k, st in saved["state"].items():
        for key, v in st.items():
            assert torch.equal(now["state"][k][key], v), key


def test_a_huge_finite_gradient_is_not_called_non_finite():
    # The fused check sums squared norms, which overflow at |g| ~ 1e19; the exact pass must
    # then clear the step (Muon's NS and AdamW are scale-free, so such a step is well defined).
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 4))
    b = nn.Parameter(torch.randn(4))
    opt = Muon([{"params": [w]}, {"params": [b], "use_muon": False}], lr=0.01, weight_decay=0.0, ns_dtype=torch.float32)
    w.grad = torch.randn(6, 4) * 1e30
    b.grad = torch.full((4,), 3e38)
    opt.step()
    assert bool(w.isfinite().all()) and bool(b.isfinite().all())  # stepped, not refused


def test_check_finite_false_lets_a_nan_gradient_through_as_torch_optimizers_do():
    # For callers that check the loss or grad norm themselves (kimi_train's trainer skips such steps).
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model(torch.randn(3, 8)).sum().backward()
    model[2].weight.grad[1, 2] = float("nan")
    model[2].bias.grad[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        MuonClip(muon_param_groups(model), lr=0.01).step()  # the default checks, also through MuonClip
    opt = MuonClip(muon_param_groups(model), lr=0.01, check_finite=False)
    opt.step()
    assert int(opt.state[model[2].weight]["momentum_buffer"].isnan().sum()) == 1
    assert bool(model[2].weight.isnan().all())  # Newton-Schulz mixes the whole matrix
    assert bool(model[2].bias[0].isnan()) and bool(model[2].bias[1:].isfinite().all())  # AdamW: per entry
    assert all(bool(p.isfinite().all()) for p in model[0].parameters())
    # A switch of the optimizer, not of its state: a default one loading this state still checks.
    checking = Muon(muon_param_groups(model), lr=0.01)
    checking.load_state_dict(opt.state_dict())
    assert checking.check_finite and not opt.check_finite
    with pytest.raises(ValueError, match=r"check_finite=0 is invalid; expected True or False"):
        Muon(muon_param_groups(model), check_finite=0)


def test_unnamed_params_error_names_the_index():
    params = _params()
    opt = Muon(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    params[2].grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="#2 of param group 0"):
        opt.step()


def test_params_without_grad_are_untouched():
    params = _params()
    opt = Muon(params, lr=0.1)
    params[0].grad = torch.randn_like(params[0])
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1].detach(), before)


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 32), nn.Linear(32, 20))
    opt = Muon(muon_param_groups(model), lr=0.01, ns_backend="torch")
    return model, opt


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 20, (4, 6), generator=g)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_exact_resume():
    model_a, opt_a = _model_and_opt()
    _train(model_a, opt_a, 10, seed=0)

    model_b, opt_b = _model_and_opt()
    g = torch.Generator().manual_seed(0)  # the same data stream, split 5 + 5
    _train(model_b, opt_b, 5, seed=0)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    model_c, opt_c = _model_and_opt(seed=123)  # fresh, different init: everything must come from the checkpoint
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    del g
    # continue the data stream where it stopped: replay 5 batches of the generator, then train 5
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        torch.randint(0, 20, (4, 6), generator=gen)
    for _ in range(5):
        x = torch.randint(0, 20, (4, 6), generator=gen)
        loss = nn.functional.cross_entropy(model_c(x).flatten(0, 1), x.flatten())
        opt_c.zero_grad()
        loss.backward()
        opt_c.step()
    for (name, a), b in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(a, b), name


def test_state_is_fp32_and_created_up_front_also_for_bf16_params():
    p = nn.Parameter(torch.randn(8, 12, dtype=torch.bfloat16))
    q = nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
    opt = Muon([{"params": [p]}, {"params": [q], "use_muon": False}], lr=0.01)
    assert opt.state[p]["momentum_buffer"].dtype == torch.float32  # before any step (init_state)
    assert opt.state[q]["exp_avg_sq"].dtype == torch.float32
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    opt.step()
    assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
    fresh = Muon([{"params": [p]}, {"params": [q], "use_muon": False}], lr=0.01)
    fresh.load_state_dict(opt.state_dict())  # torch would cast state to bf16 here
    for param in (p, q):
        for key, v in opt.state[param].items():
            assert fresh.state[param][key].dtype == torch.float32
            assert torch.equal(fresh.state[param][key], v), key


def test_muon_param_groups_routing():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(10, 8)
            self.q_proj = nn.Linear(8, 8)
            self.input_layernorm = nn.LayerNorm(8)
            self.experts = nn.Parameter(torch.zeros(4, 6, 8))
            self.lm_head = nn.Linear(8, 10, bias=False)
            self.frozen = nn.Linear(8, 8)
            self.frozen.requires_grad_(False)
            self.output = nn.Linear(8, 10, bias=False)  # torchtitan's head name
            self.attention = nn.ModuleDict({"output": nn.ModuleDict({"dense": nn.Linear(8, 8, bias=False)})})

    model = Block()
    muon, adamw = muon_param_groups(model, lr=0.1, weight_decay=0.0)
    assert muon["use_muon"] and not adamw["use_muon"] and muon["lr"] == adamw["lr"] == 0.1
    assert muon["param_names"] == ["experts", "q_proj.weight", "attention.output.dense.weight"]  # BERT-style: hidden
    assert sorted(adamw["param_names"]) == sorted(
        ["embed_tokens.weight", "q_proj.bias", "input_layernorm.weight", "input_layernorm.bias", "lm_head.weight",
         "output.weight"]
    )
    muon, adamw = muon_param_groups(model, muon_patterns=[r"^lm_head\."], adamw_patterns=["q_proj"], adamw_lr=3e-4)
    assert "lm_head.weight" in muon["param_names"] and "q_proj.weight" in adamw["param_names"]
    assert adamw["lr"] == 3e-4 and "lr" not in muon
    with pytest.raises(ValueError, match="both"):
        muon_param_groups(model, muon_patterns=["q_proj.weight"], adamw_patterns=["q_proj"])
    with pytest.raises(ValueError, match="needs >= 2 dims"):
        muon_param_groups(model, muon_patterns=["q_proj.bias"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(ns_steps=0), "ns_steps"),
        (dict(ns_method="svd"), "ns_method"),
        (dict(ns_dtype=torch.int8), "ns_dtype"),
        (dict(ns_backend="cuda"), "ns_backend"),
        (dict(adjust_lr="spectral"), "adjust_lr"),
        (dict(adamw_betas=(0.9, 1.0)), "adamw_betas"),
        (dict(adamw_eps=0.0), "adamw_eps"),
    ],
)
def test_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Muon(_params(), **kwargs)


def test_add_param_group_later_gets_state_and_checks():
    params = _params()
    opt = Muon(params[:2], lr=0.1)
    opt.add_param_group({"params": params[2:], "lr": 0.01})
    opt.add_param_group({"params": [nn.Parameter(torch.ones(3))], "use_muon": False})
    assert all("momentum_buffer" in opt.state[p] for p in params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    with pytest.raises(ValueError, match="param group 3: adjust_lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3, 3))], "adjust_lr": "x"})
    assert len(opt.param_groups) == 3


def test_ns_dtype_by_name():
    opt = Muon(_params(), ns_dtype="fp32")
    assert opt.param_groups[0]["ns_dtype"] == torch.float32
    opt = Muon([{"params": _params(), "ns_dtype": "bfloat16"}])
    assert opt.param_groups[0]["ns_dtype"] == torch.bfloat16


def test_bad_group_and_1d_param():
    with pytest.raises(ValueError, match="param group 0: ns_method"):
        Muon([{"params": _params(), "ns_method": "x"}])
    with pytest.raises(ValueError, match="use_muon=False"):
        Muon([nn.Parameter(torch.zeros(4))])
