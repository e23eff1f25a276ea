"""Config -> objects: every optim.*, schedule.* and MoE key reaches what the trainer builds.

Each test sets non-default values and reads them back from the constructed optimizer, schedule
and model, or watches them act (the lr the optimizer steps with, the gradients it consumed, read
from its state after the step, the expert-bias move). Parity between two runs cannot see these bugs (both sides share them), so
every check here compares against the config or against an independent computation.
"""

from __future__ import annotations

import math

import pytest
import torch

from kimi_train.config import validate
from kimi_train.loop.trainer import Trainer
from optim import Muon, MuonClip

from conftest import read_metrics
from test_trainer import small_cfg

NON_DEFAULT_OPTIM = dict(lr=0.0123, weight_decay=0.037, momentum=0.81, nesterov=False, ns_steps=3,
                         ns_method="polar_express", ns_dtype="fp32", ns_backend="torch", adjust_lr="original",
                         betas=[0.8, 0.9], eps=1e-6)


def _trainer(tmp_path, optim_name="muonclip", steps=4, **overrides):
    cfg = small_cfg(steps=steps)
    cfg.optim.name = optim_name
    cfg.optim.qk_clip.enabled = optim_name == "muonclip"
    for key, value in overrides.items():
        target = cfg
        *path, leaf = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return Trainer(validate(cfg), tmp_path)


def _spy_on_step(trainer, observe):
    """Call observe(trainer) right before every optimizer.step()."""
    step = trainer.optimizer.step

    def spied(*args, **kwargs):
        observe(trainer)
        return step(*args, **kwargs)

    trainer.optimizer.step = spied


@pytest.mark.parametrize("name", ["muonclip", "muon"])
def test_every_muon_key_reaches_every_param_group(tmp_path, name):
    keys = {f"optim.{k}": v for k, v in NON_DEFAULT_OPTIM.items()}
    trainer = _trainer(tmp_path, name, **keys, **{"optim.qk_clip.tau": 7.5})
    opt, o = trainer.optimizer, NON_DEFAULT_OPTIM
    assert type(opt) is (MuonClip if name == "muonclip" else Muon)
    assert {g["use_muon"] for g in opt.param_groups} == {True, False}  # both kinds are checked below
    for g in opt.param_groups:
        assert g["lr"] == o["lr"] and g["weight_decay"] == o["weight_decay"]
        assert (g["momentum"], g["nesterov"], g["ns_steps"]) == (o["momentum"], o["nesterov"], o["ns_steps"])
        assert (g["ns_method"], g["ns_dtype"], g["ns_backend"]) == (o["ns_method"], torch.float32, o["ns_backend"])
        assert g["adjust_lr"] == o["adjust_lr"]
        assert g["adamw_betas"] == tuple(o["betas"]) and g["adamw_eps"] == o["eps"]
    assert opt.check_finite is False  # the trainer checks loss and grad norm itself, before step()
    if name == "muonclip":
        assert opt.tau == 7.5
        assert opt.attention_layers == trainer.model.attention_layers()
        assert opt.process_group is trainer.dims.dp_group


def test_every_adamw_key_reaches_torch_adamw(tmp_path):
    trainer = _trainer(tmp_path, "adamw", **{"optim.lr": 0.0123, "optim.weight_decay": 0.037,
                                             "optim.betas": [0.8, 0.9], "optim.eps": 1e-6})
    opt = trainer.optimizer
    assert type(opt) is torch.optim.AdamW
    (g,) = opt.param_groups
    assert (g["lr"], g["weight_decay"], g["betas"], g["eps"]) == (0.0123, 0.037, (0.8, 0.9), 1e-6)
    assert sum(p.numel() for p in g["params"]) == trainer.num_params


@pytest.mark.parametrize("kind,shape", [("wsd", "linear"), ("wsd", "cosine"), ("cosine", "cosine"),
                                        ("constant", "cosine")])
def test_the_optimizer_steps_with_the_scheduled_lr_and_logs_it(tmp_path, kind, shape):
    """The schedule keys reach LRSchedule, and every param group steps with
    lr * m(s) for the formula of schedule.py's docstring, computed here independently;
    the logged lr is that value."""
    S, W, D, r, lr = 10, 3, 0.4, 0.25, 0.02
    trainer = _trainer(tmp_path, "muonclip", steps=S, **{"schedule.type": kind, "schedule.warmup_steps": W,
                                                         "schedule.decay_fraction": D, "schedule.decay_shape": shape,
                                                         "schedule.min_lr_ratio": r, "optim.lr": lr})
    sched = trainer.schedule
    assert (sched.total_steps, sched.warmup_steps, sched.type, sched.decay_fraction, sched.decay_shape,
            sched.min_lr_ratio) == (S, W, kind, D, shape, r)
    used = []
    _spy_on_step(trainer, lambda t: used.append([g["lr"] for g in t.optimizer.param_groups]))
    trainer.fit()

    def shape_fn(p):
        return 0.5 * (1 + math.cos(math.pi * p)) if shape == "cosine" else 1 - p

    def expected(s):
        if s < W:
            return (s + 1) / W
        if kind == "constant":
            return 1.0
        if kind == "cosine":
            return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * (s - W) / (S - W)))
        start = S - round(D * S)
        return 1.0 if s < start else r + (1 - r) * shape_fn((s - start + 1) / round(D * S))

    want = [lr * expected(s) for s in range(S)]
    assert len(used) == S
    for s, lrs in enumerate(used):
        assert lrs == pytest.approx([want[s]] * len(lrs), rel=1e-12), s
    logged = [r_["lr"] for r_ in read_metrics(tmp_path) if "lr" in r_]
    assert logged == pytest.approx(want, rel=1e-12)
    assert len(set(round(x, 12) for x in want)) > 2 or kind == "constant"  # the schedule does move


def _record_gradients(trainer) -> dict:
    """parameter -> its gradient as the backward passes leave it, before any clip (the hook runs after
    each micro-batch's accumulation into .grad; the last call holds the step's whole gradient)."""
    raw = {}
    for p in trainer.model.parameters():
        p.register_post_accumulate_grad_hook(lambda q: raw.__setitem__(q, q.grad.detach().double().clone()))
    return raw


def _consumed_gradients(optimizer) -> dict:
    """parameter -> the gradient its first step consumed, read back from the optimizer's state: Muon's
    momentum buffer starts at zero, so after one step it is the gradient (M <- mu M + G); AdamW's first
    moment is (1 - beta1) G (torch.optim.AdamW, and Muon's AdamW for the non-matrix parameters)."""
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if group.get("use_muon", False):
                out[p] = state["momentum_buffer"].double()
            else:
                beta1 = group["adamw_betas"][0] if "adamw_betas" in group else group["betas"][0]
                out[p] = state["exp_avg"].double() / (1 - beta1)
    return out


@pytest.mark.parametrize("optim_name,grad_clip", [("muonclip", 0.0), ("muonclip", 1e-3), ("adamw", 1e-3)])
def test_the_optimizer_consumes_the_clipped_gradients(tmp_path, optim_name, grad_clip):
    """What the optimizer consumed (its state after the first step), not what step() was handed:
    the whole accumulated gradient times min(1, grad_clip / its global norm), computed here."""
    # a global batch of 8 in micro-batches of 4: the gradient is accumulated over two backward passes
    trainer = _trainer(tmp_path, optim_name, steps=2, **{"optim.grad_clip": grad_clip, "train.global_batch_size": 8})
    raw = _record_gradients(trainer)
    record = trainer.train_step()
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in raw.values()))
    assert record["grad_norm"] == pytest.approx(norm, rel=1e-5)  # the norm before clipping is logged
    assert norm > 0.01 and (not grad_clip or norm > 10 * grad_clip)  # so a 1e-3 clip does scale
    scale = min(1.0, grad_clip / (norm + 1e-6)) if grad_clip else 1.0
    consumed = _consumed_gradients(trainer.optimizer)
    assert set(consumed) == set(raw) == set(trainer.model.parameters())
    for name, p in trainer.model.named_parameters():
        want = raw[p] * scale
        err = float((consumed[p] - want).norm() / want.norm())
        assert err < 1e-5, f"{name}: the optimizer consumed {float(consumed[p].norm()):.3e}, the clip left {float(want.norm()):.3e}"


def test_moe_keys_reach_the_model(tmp_path):
    keys = {"model.num_hidden_layers": 3, "model.first_k_dense_replace": 2, "model.n_routed_experts": 6,
            "model.num_experts_per_tok": 3, "model.n_shared_experts": 2, "model.moe_intermediate_size": 24,
            "model.routed_scaling_factor": 1.7, "model.n_group": 3, "model.topk_group": 2,
            "model.norm_topk_prob": False}
    trainer = _trainer(tmp_path, **keys)
    layers = trainer.model.model.layers
    assert [type(layer.mlp).__name__ for layer in layers] == ["FeedForward", "FeedForward", "MoE"]
    (moe,) = trainer.model.moe_layers()
    assert moe is layers[2].mlp
    gate = moe.gate
    assert (moe.num_experts, moe.top_k, gate.num_experts, gate.top_k) == (6, 3, 6, 3)
    assert (gate.n_group, gate.topk_group, gate.norm_topk_prob, gate.routed_scaling_factor) == (3, 2, False, 1.7)
    assert tuple(moe.experts.gate_proj.shape) == (6, 24, trainer.cfg.model.hidden_size)
    assert moe.shared_experts.gate_proj.weight.shape[0] == 24 * 2
    assert tuple(gate.e_score_correction_bias.shape) == (6,)


def test_expert_bias_rate_sets_the_bias_step(tmp_path):
    """One step from zero biases moves each by rate * (sign(mean - load_e) - its mean over experts):
    the update computed here from the step's own routed-token counts."""
    rate = 0.037
    trainer = _trainer(tmp_path, **{"train.expert_bias_rate": rate})
    counts = []
    _spy_on_step(trainer, lambda t: counts.extend(m.routed_counts().clone() for m in t.model.moe_layers()))
    trainer.train_step()
    assert counts and all(c.sum() > 0 for c in counts)
    for moe, counts_E in zip(trainer.model.moe_layers(), counts):
        sign_E = torch.sign(counts_E.mean() - counts_E)
        want_E = rate * (sign_E - sign_E.mean())
        assert want_E.abs().max() > 0
        torch.testing.assert_close(moe.gate.e_score_correction_bias, want_E, rtol=1e-6, atol=1e-9)
