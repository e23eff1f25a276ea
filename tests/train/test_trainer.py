"""In-process trainer checks: non-finite steps, gradient accumulation, checkpoints, load_model_from_run, plots."""

import json
import math
import shutil

import pytest
import torch

from kimi_train import checkpoint as ckpt
from kimi_train.config import (CheckpointConfig, DataConfig, LoggingConfig, ScheduleConfig, TrainConfig,
                               TrainLoopConfig, validate)
from kimi_train.model.config import ModelConfig
from kimi_train.plots import main as plot_main
from kimi_train.trainer import Trainer, TrainingError

from conftest import read_metrics, run_cli


def small_cfg(**train) -> TrainConfig:
    """A 2-layer model on 60 kB; fp32 also on CUDA (the exactness checks are to 1e-5), the gpu
    tests pass dtype="bf16"."""
    model = ModelConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2)
    t = dict(steps=4, seq_len=32, micro_batch_size=4, log_every=1, val_every=0, val_batches=1, max_skipped_steps=1,
             dtype="fp32")
    cfg = TrainConfig(model=model, train=TrainLoopConfig(**{**t, **train}), schedule=ScheduleConfig(warmup_steps=0),
                      data=DataConfig(max_bytes=60_000), checkpoint=CheckpointConfig(every=0, keep=1),
                      logging=LoggingConfig(wandb="disabled", progress_bar=False, plots=False))
    return validate(cfg)


def _poison(trainer, steps):
    """Make the loss NaN at the given (1-based) steps."""
    loss_fn = trainer._loss

    def loss(batch):
        out = loss_fn(batch)
        return out * float("nan") if trainer.step + 1 in steps else out

    trainer._loss = loss


def test_non_finite_step_is_skipped_and_params_untouched(tmp_path):
    trainer = Trainer(small_cfg(), tmp_path)
    _poison(trainer, {2})
    trainer.train_step()
    trainer.step += 1
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.warns(UserWarning, match=r"step 2: non-finite loss=nan .* step skipped \(1/1\)"):
        record = trainer.train_step()
    assert record["skipped"] and trainer.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(p.grad is None for p in trainer.model.parameters())
    assert all(m.tokens_per_expert.sum() == 0 for m in trainer.model.moe_layers())


def test_too_many_non_finite_steps_stop_with_a_clear_error_and_no_checkpoint(tmp_path):
    trainer = Trainer(small_cfg(), tmp_path)
    _poison(trainer, {2, 3})
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match=r"2 skipped steps > train.max_skipped_steps=1"):
        trainer.fit()
    assert ckpt.latest_checkpoint(tmp_path) is None
    records = read_metrics(tmp_path)
    assert records[-1]["step"] == 2 and records[-1]["skipped_steps"] == 1 and records[-1]["loss"] == "nan"


def test_post_step_max_logit_is_tau_on_the_same_batch_when_the_update_is_negligible(tmp_path):
    """logging.post_step_max_logit re-runs the step's batch (both micro-batches) after the update and
    the clip. With a ~0 lr the update changes nothing, so layer 0, whose input the clip cannot
    change, shows exactly tau. Layer 1's heads were clipped to tau on the old layer-0 output; the
    clip of layer 0 changed that output a little, so its post-step max is tau only approximately."""
    cfg = small_cfg(steps=2, global_batch_size=8)
    cfg.optim.lr, cfg.optim.qk_clip.tau = 1e-12, 0.02
    cfg.logging.post_step_max_logit = True
    trainer = Trainer(validate(cfg), tmp_path)
    record = trainer.train_step()
    assert record["clipped_heads_per_layer"] == [cfg.model.num_attention_heads] * 2
    assert min(record["max_logit_per_layer"]) > 2 * 0.02
    post = record["max_logit_post_step_per_layer"]
    assert post[0] == pytest.approx(0.02, rel=1e-5)
    assert post[1] == pytest.approx(0.02, rel=1e-3) and post[1] != pytest.approx(0.02, rel=1e-6)
    assert record["max_logit_post_step"] == max(post)
    assert all(layer.max_logits is None for layer in trainer.model.attention_layers())
    assert trainer.model.training


def test_remeasure_clips_the_updated_weights_on_the_steps_batch(tmp_path):
    """optim.qk_clip.remeasure=n clips with the max logits of the updated weights (n no-grad passes
    over the step's batch) instead of the step's forward. At lr 0.05 K2's order leaves the clipped
    heads over tau on their own batch; one pass puts layer 0 on tau, two passes both layers."""
    post = {}
    for passes in (0, 1, 2):
        cfg = small_cfg(steps=1, global_batch_size=8)
        cfg.optim.lr, cfg.optim.qk_clip.tau, cfg.optim.qk_clip.remeasure = 0.05, 0.05, passes
        cfg.logging.post_step_max_logit = True
        trainer = Trainer(validate(cfg), tmp_path / str(passes))
        record = trainer.train_step()
        post[passes] = record["max_logit_post_step_per_layer"]
        biases = [m.gate.e_score_correction_bias.clone() for m in trainer.model.moe_layers()]
        if passes == 0:
            assert "max_logit_remeasured" not in record
            base, base_biases = record, biases
            continue
        # the expert-bias update saw only the training forward's routed-token counts
        assert all(torch.equal(a, b) for a, b in zip(biases, base_biases)) and biases[0].abs().sum() > 0
        # the logged max logit is still the step's forward; the re-measurement is logged beside it
        assert record["max_logit_per_layer"] == base["max_logit_per_layer"]
        assert record["max_logit_remeasured"] == max(record["max_logit_remeasured_per_layer"])
        assert record["clipped_heads"] > 0 and trainer.model.training
    tau = 0.05
    assert max(post[0]) > 1.05 * tau
    assert post[1][0] == pytest.approx(tau, rel=1e-5)
    assert all(p == pytest.approx(tau, rel=1e-5) for p in post[2])


def _clip_run(tmp_path, steps=4, tau=0.05, dtype="fp32", **qk_clip):
    """The records of a 2-layer MuonClip run at lr 0.05 with these optim.qk_clip values."""
    cfg = small_cfg(steps=steps, global_batch_size=8, dtype=dtype)
    cfg.optim.lr, cfg.optim.qk_clip.tau = 0.05, tau
    for key, value in qk_clip.items():
        setattr(cfg.optim.qk_clip, key, value)
    trainer = Trainer(validate(cfg), tmp_path)
    records = []
    for _ in range(steps):
        records.append(trainer.train_step())
        trainer.step += 1
    return trainer, records


def test_lookahead_bounds_every_steps_forward_by_tau(tmp_path):
    """optim.qk_clip.lookahead runs the re-measure passes before each forward, on the batch it is
    about to train on: every step's own forward (the logged max_logit) is then at most tau, with
    two passes for the two layers. K2's order and the after-update re-measure leave steps over tau.
    The pass's value before its clip is logged as max_logit_remeasured; its clipped heads count."""
    tau = 0.05
    _, k2 = _clip_run(tmp_path / "k2")
    _, after = _clip_run(tmp_path / "after", remeasure=2)
    trainer, ahead = _clip_run(tmp_path / "ahead", remeasure=2, lookahead=True)
    assert trainer.lookahead and trainer.pool is None
    assert max(r["max_logit"] for r in k2[1:]) > 1.05 * tau
    assert max(r["max_logit"] for r in after[1:]) > 1.05 * tau
    assert all(r["max_logit"] <= tau * (1 + 1e-5) for r in ahead)
    assert any(r["max_logit"] == pytest.approx(tau, rel=1e-5) for r in ahead)
    assert all(r["max_logit_remeasured"] == max(r["max_logit_remeasured_per_layer"]) for r in ahead)
    assert max(r["max_logit_remeasured"] for r in ahead) > 1.05 * tau  # what each step's clip removed
    assert all(r["clipped_heads"] > 0 for r in ahead if r["max_logit_remeasured"] > tau)
    assert all(r["clipped_heads"] == sum(r["clipped_heads_per_layer"]) for r in ahead)
    assert all(n <= 2 for r in ahead for n in r["clipped_heads_per_layer"])  # each of the 2 heads once
    # one pass: layer 0 (its input does not depend on the clips) is bounded; layer 1 can land off tau
    _, one = _clip_run(tmp_path / "one", remeasure=1, lookahead=True)
    assert all(r["max_logit_per_layer"][0] <= tau * (1 + 1e-5) for r in one)


def test_lookahead_measurement_has_no_side_effects(tmp_path):
    """With tau far above every logit the lookahead clips nothing; its forwards must then leave the
    run bit-identical to one without it (no MoE token counts, no RNG draws, no gradients)."""
    def key(records):
        return [(r["loss"], r["grad_norm"], r["max_logit"], r["expert_load_imbalance"]) for r in records]

    _, plain = _clip_run(tmp_path / "plain", tau=1e6)
    trainer, ahead = _clip_run(tmp_path / "ahead", tau=1e6, remeasure=1, remeasure_scan=3, lookahead=True)
    assert key(ahead) == key(plain)
    assert all(r["clipped_heads"] == 0 and r["max_logit_remeasured"] > 0 for r in ahead)


def test_lookahead_counts_each_clipped_head_once_and_still_clips_after_the_update(tmp_path, monkeypatch):
    """With one pass, layer 1 can come out a little over tau in the step's forward; K2's clip
    after the update then clips it with the forward's max logits (MuonClip.step is still called,
    with those records). A head clipped both before the forward and after the update counts once."""
    tau = 0.05
    cfg = small_cfg(steps=6, global_batch_size=8)
    cfg.optim.lr, cfg.optim.qk_clip.tau = 0.05, tau
    cfg.optim.qk_clip.remeasure, cfg.optim.qk_clip.lookahead = 1, True
    trainer = Trainer(validate(cfg), tmp_path)
    calls = []
    clip = trainer.optimizer._clip
    monkeypatch.setattr(trainer.optimizer, "_clip", lambda S_L: calls.append(S_L) or clip(S_L))
    both = 0
    for _ in range(6):
        calls.clear()
        record = trainer.train_step()
        trainer.step += 1
        assert len(calls) == 2  # the pass before the forward, then step()'s clip
        after_update = calls[1]
        assert [float(S.max()) for S in after_update] == record["max_logit_per_layer"]
        before = [S > tau for S in calls[0]]
        after = [S > tau for S in after_update]
        union = [int((b | a).sum()) for b, a in zip(before, after)]
        assert record["clipped_heads_per_layer"] == union
        both += sum(int((b & a).sum()) for b, a in zip(before, after))
    assert both > 0  # heads clipped twice in a step were counted once


def test_lookahead_counts_a_head_clipped_only_after_the_update(tmp_path, monkeypatch):
    """A head the pass before the forward left alone but the step's forward recorded over tau is
    clipped by step() and counted with the pass's heads (the record stands in for a later layer
    whose input moved). tau is far above every real logit, so the pass clips nothing."""
    tau = 1e6
    cfg = small_cfg(steps=2, global_batch_size=8)
    cfg.optim.lr, cfg.optim.qk_clip.tau = 0.05, tau
    cfg.optim.qk_clip.remeasure, cfg.optim.qk_clip.lookahead = 1, True
    trainer = Trainer(validate(cfg), tmp_path)
    opt = trainer.optimizer
    seen = {}
    measure_and_clip, step = opt.measure_and_clip_, opt.step

    def measure_and_clip_(*args, **kwargs):
        seen["pre"] = measure_and_clip(*args, **kwargs)
        return seen["pre"]

    def step_with_a_record_over_tau(*args, **kwargs):
        masks = seen["pre"]["clipped_heads_mask_per_layer"]
        layer, head = next((i, h) for i, m in enumerate(masks) for h, c in enumerate(m) if not c)
        seen["extra"] = (layer, head)
        trainer.model.attention_layers()[layer].max_logits[head] = 3 * tau
        return step(*args, **kwargs)

    monkeypatch.setattr(opt, "measure_and_clip_", measure_and_clip_)
    monkeypatch.setattr(opt, "step", step_with_a_record_over_tau)
    record = trainer.train_step()
    layer, head = seen["extra"]
    assert opt.last_stats["clipped_heads_mask_per_layer"][layer][head]
    pre = seen["pre"]["clipped_heads_per_layer"]
    after = opt.last_stats["clipped_heads_mask_per_layer"]
    union = [sum(b or a for b, a in zip(mb, ma)) for mb, ma in zip(seen["pre"]["clipped_heads_mask_per_layer"], after)]
    assert record["clipped_heads_per_layer"] == union and union[layer] == pre[layer] + 1
    assert sum(pre) == 0 and record["clipped_heads"] == 1


def test_lookahead_skipped_step_keeps_its_clip_and_logs_it(tmp_path):
    """A step skipped for a non-finite loss has already been clipped before its forward (with
    finite weights): the clip stays and is logged, nothing else changes. A non-finite max logit
    in the pass before the forward skips the step too, as its forward would be non-finite."""
    cfg = small_cfg(steps=3, global_batch_size=8, max_skipped_steps=2)
    cfg.optim.lr, cfg.optim.qk_clip.tau = 0.05, 0.05
    cfg.optim.qk_clip.remeasure, cfg.optim.qk_clip.lookahead = 1, True
    trainer = Trainer(validate(cfg), tmp_path)
    trainer.train_step()
    trainer.step += 1
    _poison(trainer, {2})
    qk = {id(p) for a in trainer.model.attention_layers()
          for p in (a.qk_clip_target().w_q, a.qk_clip_target().w_k)}
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with pytest.warns(UserWarning, match=r"step 2: non-finite loss=nan .* step skipped \(1/2\)"):
        record = trainer.train_step()
    trainer.step += 1
    assert record["skipped"] and record["clipped_heads"] > 0 and record["max_logit_remeasured"] > 0.05
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(id(dict(trainer.model.named_parameters())[n]) in qk for n in changed)

    remeasure = trainer._remeasure

    def nan_pass(*args, **kwargs):
        out = remeasure(*args, **kwargs)
        trainer.model.attention_layers()[1].max_logits[0] = math.nan
        return out

    trainer._remeasure = nan_pass
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.warns(UserWarning, match=r"step 3: non-finite max logit before the forward .*head 0.* step skipped \(2/2\)"):
        record = trainer.train_step()
    assert record["skipped"] and math.isnan(record["loss"]) and trainer.skipped_steps == 2
    assert "clipped_heads" not in record  # one pass, refused whole: nothing was clipped
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(a.max_logits is None for a in trainer.model.attention_layers())
    assert all(m.tokens_per_expert.sum() == 0 for m in trainer.model.moe_layers())


def _layer_max_logits(trainer, sequences_NT1):
    """[layers] max logits of the trainer's current weights on these sequences."""
    layers = trainer.model.attention_layers()
    trainer.model.measure_max_logits(sequences_NT1[:, :-1])
    out = [float(a.max_logits.max()) for a in layers]
    for a in layers:
        a.reset_max_logits()
    return out


def test_remeasure_pool_keeps_the_clip_on_the_sequences_of_earlier_batches(tmp_path):
    """optim.qk_clip.remeasure_pool=n re-measures each head's n highest-logit sequences so far with
    the step's batch. After three steps the pooled sequences (from earlier batches too) give at
    most tau; without the pool the earlier batches come out over tau."""
    tau, seen, trainers = 0.05, {}, {}
    for pool in (0, 2):
        cfg = small_cfg(steps=3, global_batch_size=8)
        cfg.optim.lr, cfg.optim.qk_clip.tau = 0.05, tau
        cfg.optim.qk_clip.remeasure, cfg.optim.qk_clip.remeasure_pool = 2, pool
        trainer = Trainer(validate(cfg), tmp_path / str(pool))
        seen[pool], next_batch = [], trainer.train_loader.next_batch
        trainer.train_loader.next_batch = lambda nb=next_batch, out=seen[pool]: out.append(nb()) or out[-1]
        for _ in range(3):
            record = trainer.train_step()
            trainer.step += 1
        assert record["clipped_heads"] > 0
        trainers[pool] = trainer
    assert trainers[0].pool is None
    with_pool = trainers[2]
    earlier = torch.cat([mb for step in seen[2][:2] for mb in step])
    pooled = with_pool.pool.sequences
    assert 0 < len(pooled) <= 2 * 2 * 2  # per_head x layers x heads, fewer when rows are shared
    assert any((row == earlier).all(1).any() for row in pooled)  # it holds sequences of earlier batches
    # the clip held on pool + batch, whose maximum every head's top sequence (now pooled) attains
    on_pool = _layer_max_logits(with_pool, pooled)
    assert on_pool[0] == pytest.approx(tau, rel=1e-5) and all(m <= tau * (1 + 1e-5) for m in on_pool)
    assert max(_layer_max_logits(with_pool, torch.cat(seen[2][-1]))) <= tau * (1 + 1e-5)
    without = _layer_max_logits(trainers[0], torch.cat([mb for step in seen[0][:2] for mb in step]))
    assert max(without) > 1.05 * tau


@pytest.mark.parametrize("name,enabled", [("muonclip", False), ("adamw", True)])
def test_remeasure_pool_and_scan_are_ignored_without_qk_clip(tmp_path, name, enabled):
    """Like remeasure and tau, the pool, the scan and the lookahead only act with QK-Clip on, so one sweep can
    cover Muon (muonclip with the clip off), AdamW and MuonClip."""
    cfg = small_cfg(steps=1)
    cfg.optim.name, cfg.optim.qk_clip.enabled = name, enabled
    q = cfg.optim.qk_clip
    q.remeasure, q.remeasure_pool, q.remeasure_scan, q.lookahead = 1, 2, 4, True
    trainer = Trainer(validate(cfg), tmp_path)
    record = trainer.train_step()
    assert trainer.pool is None and not trainer.lookahead
    assert "max_logit_remeasured" not in record and record["clipped_heads"] == 0


def test_remeasure_scan_adds_random_windows_the_step_does_not_train_on(tmp_path):
    """optim.qk_clip.remeasure_scan=n re-measures n random training windows with the batch: drawn
    from (seed, step, rank) only, so the same on a resume; they reach the pool and the clip holds on them."""
    cfg = small_cfg(steps=2)
    cfg.optim.lr, cfg.optim.qk_clip.tau = 0.05, 0.05
    q = cfg.optim.qk_clip
    q.remeasure, q.remeasure_pool, q.remeasure_scan = 1, 4, 6
    trainer = Trainer(validate(cfg), tmp_path / "a")
    other = Trainer(validate(cfg), tmp_path / "b")
    (first,) = trainer._scan_windows()
    assert first.shape == (6, cfg.train.seq_len + 1) and torch.equal(other._scan_windows()[0], first)
    trained = []
    next_batch = trainer.train_loader.next_batch
    trainer.train_loader.next_batch = lambda: trained.append(next_batch()) or trained[-1]
    for _ in range(2):
        trainer.train_step()
        trainer.step += 1
    assert not torch.equal(trainer._scan_windows()[0], first)
    trained = torch.cat([mb for step in trained for mb in step])
    from_scan = [row for row in trainer.pool.sequences if not (row == trained).all(1).any()]
    assert from_scan  # some head's highest logits came from a scanned window
    assert max(_layer_max_logits(trainer, torch.stack(from_scan))) <= 0.05 * (1 + 1e-3)


@pytest.mark.gpu
def test_remeasure_pool_and_scan_on_cuda_with_bf16(tmp_path):
    """On CUDA (bf16 autocast, per-sequence max logits from the Triton kernel) the pool stays on
    the CPU and the clip holds on it to bf16 rounding."""
    cfg = small_cfg(steps=3, dtype="bf16")
    cfg.optim.lr, cfg.optim.qk_clip.tau = 0.05, 0.05
    q = cfg.optim.qk_clip
    q.remeasure, q.remeasure_pool, q.remeasure_scan = 2, 2, 4
    trainer = Trainer(validate(cfg), tmp_path)
    assert trainer.device.type == "cuda"
    for _ in range(3):
        record = trainer.train_step()
        trainer.step += 1
    assert record["clipped_heads"] > 0 and len(trainer.pool) > 0 and trainer.pool.sequences.device.type == "cpu"
    with trainer.autocast():
        on_pool = _layer_max_logits(trainer, trainer.pool.sequences.cuda())
    assert on_pool[0] == pytest.approx(0.05, rel=2e-2) and max(on_pool) <= 0.05 * 1.02


@pytest.mark.gpu
def test_lookahead_on_cuda_with_bf16(tmp_path):
    """On CUDA the passes before the forward measure with the Triton max-logit kernel under bf16
    autocast, the step's forward records its own max: the bound holds to bf16 rounding."""
    tau = 0.05
    trainer, records = _clip_run(tmp_path, steps=4, tau=tau, dtype="bf16", remeasure=2, lookahead=True)
    assert trainer.device.type == "cuda"
    assert any(r["clipped_heads"] > 0 for r in records)
    assert max(r["max_logit_remeasured"] for r in records) > 1.05 * tau
    assert all(r["max_logit"] <= tau * 1.02 for r in records)


@pytest.mark.parametrize("lookahead", [False, True])
def test_remeasure_pool_is_saved_with_the_checkpoint_and_resumes_exactly(tmp_path, lookahead):
    """A run stopped at step 2 and resumed matches the uninterrupted run, because the pool comes
    back from the checkpoint (the scan is drawn from the step alone); resumed with the pool file
    removed, it does not. The same with the passes before each forward (lookahead)."""

    def run(run_dir, steps):
        cfg = small_cfg(steps=steps, global_batch_size=8)
        cfg.optim.lr, cfg.optim.qk_clip.tau = 0.05, 0.05
        q = cfg.optim.qk_clip
        q.remeasure, q.remeasure_pool, q.remeasure_scan, q.lookahead = 1, 2, 2, lookahead
        cfg.checkpoint.every = 2
        Trainer(validate(cfg), run_dir).fit()
        return [(r["loss"], r["max_logit"], r["max_logit_remeasured"], r["clipped_heads"])
                for r in read_metrics(run_dir) if "loss" in r]

    full = run(tmp_path / "full", 4)
    assert run(tmp_path / "cut", 2) == full[:2]
    saved = ckpt.checkpoint_path(tmp_path / "cut", 2) / "qk_clip_pool_rank0.npy"
    assert saved.is_file()
    shutil.copytree(tmp_path / "cut", tmp_path / "lost")
    (ckpt.checkpoint_path(tmp_path / "lost", 2) / "qk_clip_pool_rank0.npy").unlink()
    assert run(tmp_path / "cut", 4) == full
    with pytest.warns(UserWarning, match=r"step_00000002 holds QK-Clip re-measure pools of 0 rank\(s\), this run has 1"):
        lost = run(tmp_path / "lost", 4)
    assert lost[2:] != full[2:]


def test_post_step_max_logit_leaves_the_training_trajectory_unchanged(tmp_path):
    """The extra forward is no-grad and leaves the MoE token counts alone: the same losses, max
    logits, weights, buffers and optimizer state as a run without it."""
    records, states = {}, {}
    for flag in (False, True):
        cfg = small_cfg(steps=3)
        cfg.optim.qk_clip.tau = 0.05
        cfg.logging.post_step_max_logit = flag
        trainer = Trainer(validate(cfg), tmp_path / str(flag))
        records[flag] = []
        for _ in range(3):
            records[flag].append(trainer.train_step())
            trainer.step += 1
        states[flag] = (trainer.model.state_dict(), trainer.optimizer.state_dict()["state"])
    assert sum(r["clipped_heads"] for r in records[True]) > 0
    for off, on in zip(records[False], records[True]):
        assert "max_logit_post_step" not in off and on["max_logit_post_step"] > 0
        assert {k: on[k] for k in off} == off
    (model_off, opt_off), (model_on, opt_on) = states[False], states[True]
    assert model_off.keys() == model_on.keys()
    assert all(torch.equal(model_off[k], model_on[k]) for k in model_off)
    assert all(torch.equal(opt_off[i][k], opt_on[i][k]) for i in opt_off for k in opt_off[i])

    # the counts the expert-bias update reads: a training forward adds to them, the diagnostic does not
    micro_batches = trainer.train_loader.next_batch()
    trainer._loss(micro_batches[0])
    counts = [m.tokens_per_expert.clone() for m in trainer.model.moe_layers()]
    assert sum(float(c.sum()) for c in counts) > 0
    trainer._post_step_max_logits(micro_batches)
    assert all(torch.equal(c, m.tokens_per_expert) for c, m in zip(counts, trainer.model.moe_layers()))


def test_checkpoint_with_non_finite_values_is_refused(tmp_path):
    trainer = Trainer(small_cfg(), tmp_path)
    with torch.no_grad():
        next(trainer.model.parameters())[0, 0] = math.inf
    with pytest.raises(TrainingError, match="refusing to write a checkpoint"):
        trainer.save()
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_grad_accumulation_matches_one_big_micro_batch(tmp_path):
    one = Trainer(small_cfg(micro_batch_size=4), tmp_path / "a")
    two = Trainer(small_cfg(micro_batch_size=2, global_batch_size=4), tmp_path / "b")
    assert two.accum == 2 and one.accum == 1
    for _ in range(2):
        r1, r2 = one.train_step(), two.train_step()
        one.step += 1
        two.step += 1
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-4)


def test_interrupted_or_unmarked_checkpoints_are_ignored_and_pruned(tmp_path):
    trainer = Trainer(small_cfg(), tmp_path)
    trainer.step = 2
    trainer.save()
    good = ckpt.checkpoint_path(tmp_path, 2)
    torn = ckpt.checkpoint_path(tmp_path, 3).with_name("step_00000003.tmp")
    torn.mkdir()
    (torn / "trainer_state.json").write_text("{}")
    unmarked = ckpt.checkpoint_path(tmp_path, 4)  # e.g. copied by hand, no COMPLETE marker
    unmarked.mkdir()
    (unmarked / "trainer_state.json").write_text("{}")
    assert ckpt.latest_checkpoint(tmp_path) == good
    state = ckpt.load_checkpoint(good, trainer.model, trainer.optimizer)
    assert state["step"] == 2 and state["data"]["position"] == 0
    trainer.step = 5
    trainer.save()  # keep=1: step 2 goes, and the stale lower-numbered leftovers with it
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000005"]


def test_rng_state_round_trip_is_json():
    state = json.loads(json.dumps(ckpt.rng_state()))
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_fit_writes_outputs_and_load_model_from_run_restores_weights(tmp_path):
    cfg = small_cfg(steps=3, val_every=2)
    cfg.logging.plots = True
    trainer = Trainer(cfg, tmp_path, resolved_config={"model": cfg.model.to_dict(), "optim": {"name": "muonclip"}})
    summary = trainer.fit()
    assert summary["steps"] == 3 and 0 < summary["unigram_entropy"] < math.log(256)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "max_logit", "max_logit_per_layer", "clipped_heads",
                "expert_load_imbalance", "skipped_steps"):
        assert key in records[-1], key
    assert len(records[-1]["max_logit_per_layer"]) == 2 and "val_loss" in records[1] and "val_loss" not in records[0]
    for name in ("loss", "max_logit", "clipped_heads", "expert_load", "lr"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    model = ckpt.load_model_from_run(tmp_path)
    for (n, a), b in zip(model.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="has no config.yaml"):
        ckpt.load_model_from_run(tmp_path / "nothing")


def test_plot_cli_overlays_runs(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        d = tmp_path / name
        d.mkdir()
        rows = [{"step": s, "loss": scale / s, "lr": 1e-3, "max_logit": 5.0 * s, "max_logit_per_layer": [s, 2 * s],
                 "clipped_heads": s % 2, "expert_load_imbalance_per_layer": [1.5]} for s in range(1, 5)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")])
    assert len(capsys.readouterr().out.split()) == 5
    assert (tmp_path / "cmp" / "max_logit.png").is_file()
    with pytest.raises(SystemExit) as exc:
        plot_main([str(tmp_path / "missing")])
    assert exc.value.code == 2


def test_multirun_gives_each_run_its_own_directory(tmp_path, small_overrides):
    proc = run_cli(["-m", "optim=muonclip,adamw", *small_overrides, "train.steps=2", "train.val_batches=0",
                    "optim.lr=0.001,0.002", f"run_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted(p.parent for p in tmp_path.glob("*/metrics.jsonl"))
    names = {p.name for p in runs}  # swept keys only, sorted by key (as Hydra's override_dirname)
    assert names == {f"optim.lr={lr},optim={o}" for lr in ("0.001", "0.002") for o in ("adamw", "muonclip")}
    for run in runs:
        assert [r["step"] for r in read_metrics(run)] == [1, 2]
        assert (run / "config.yaml").read_text().count(f"run_dir: {run}") == 1


def test_multirun_names_jobs_by_the_sweeps_a_config_declares(tmp_path, small_overrides):
    # An experiment config may sweep in hydra.sweeper.params instead of on the command line;
    # its swept keys name the job directories too, and a key it pins (train.steps) does not.
    experiment = tmp_path / "configs" / "experiment" / "declared_sweep.yaml"
    experiment.parent.mkdir(parents=True)
    experiment.write_text("# @package _global_\n"
                          "hydra:\n  sweeper:\n    params:\n      optim: muon,adamw\n      train.steps: 1\n")
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["-m", f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "experiment=declared_sweep",
                    *small_overrides, "train.val_batches=0", f"run_dir={sweep_dir}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted(p.parent for p in sweep_dir.glob("*/metrics.jsonl"))
    assert [run.name for run in runs] == ["optim=adamw", "optim=muon"]
    assert all([r["step"] for r in read_metrics(run)] == [1] for run in runs)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_model_trains_like_eager(tmp_path):
    """train.compile=true: the same losses as eager (fp32, CPU) over a few steps. Regression: the
    MoE's grouped GEMM used to hand fp32 to torch's grouped_mm, which compile rejects (bf16 only)."""
    losses = {}
    for compiled in (False, True):
        trainer = Trainer(small_cfg(steps=3, compile=compiled), tmp_path / str(compiled))
        losses[compiled] = [trainer.train_step()["loss"] for _ in range(3)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_metrics_logger_flattens_every_per_layer_list_for_wandb(tmp_path):
    from kimi_train.metrics import MetricsLogger

    class FakeRun:
        def __init__(self):
            self.logged = []

        def log(self, values, step):
            self.logged.append((step, values))

        def finish(self):
            pass

    logger = MetricsLogger(tmp_path, enabled=True, resume_step=0)
    logger._wandb = FakeRun()
    logger.log({"step": 3, "loss": 1.5, "max_logit": 2.0, "max_logit_per_layer": [1.0, 2.0],
                "max_logit_remeasured_per_layer": [0.5, 3.0], "clipped_heads_per_layer": [0, 1], "skipped": None})
    logger.close()
    step, values = logger._wandb.logged[0]
    assert step == 3 and values == {
        "step": 3, "loss": 1.5, "max_logit": 2.0, "max_logit_per_layer/0": 1.0, "max_logit_per_layer/1": 2.0,
        "max_logit_remeasured_per_layer/0": 0.5, "max_logit_remeasured_per_layer/1": 3.0,
        "clipped_heads_per_layer/0": 0, "clipped_heads_per_layer/1": 1}
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["max_logit_per_layer"] == [1.0, 2.0]
