"""In-process trainer checks: non-finite steps, gradient accumulation, checkpoints, load_model_from_run, plots."""

import json
import math
import shutil

import pytest
import torch

from kimi_train.loop import checkpoint as ckpt
from kimi_train.tools.run_model import load_model_from_run
from kimi_train.config import (CheckpointConfig, DataConfig, LoggingConfig, ScheduleConfig, TrainConfig,
                               TrainLoopConfig, validate)
from kimi_train.model.config import ModelConfig
from kimi_train.analysis.plots import main as plot_main
from kimi_train.loop.trainer import Trainer, TrainingError

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
    assert all(m.routed_counts().sum() == 0 for m in trainer.model.moe_layers())


def test_too_many_non_finite_steps_stop_with_a_clear_error_and_the_last_good_weights_saved(tmp_path):
    trainer = Trainer(small_cfg(), tmp_path)
    _poison(trainer, {2, 3})
    after_step_1 = {}
    train_step = trainer.train_step

    def spy():
        if trainer.step == 1:
            after_step_1.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return train_step()

    trainer.train_step = spy
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match=r"step 3: non-finite loss=nan .*"
                                                  r"2 skipped steps > train.max_skipped_steps=1.* saved as step 3"):
        trainer.fit()
    # saved at the step it stopped (both batches consumed), with the weights of step 1
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.checkpoint_path(tmp_path, 3)
    fresh = Trainer(small_cfg(), tmp_path)
    assert fresh.step == 3 and fresh.skipped_steps == 2
    assert all(torch.equal(after_step_1[k], v) for k, v in fresh.model.state_dict().items())
    records = read_metrics(tmp_path)
    assert [(r["step"], r.get("skipped"), r["skipped_steps"]) for r in records] == [(1, None, 0), (2, True, 1), (3, True, 2)]
    assert records[-1]["loss"] == "nan"


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


def _clip_run(tmp_path, steps=4, tau=0.05, dtype="fp32", lr=0.05, post_step=False):
    """The records of a 2-layer MuonClip run at this lr and tau."""
    cfg = small_cfg(steps=steps, global_batch_size=8, dtype=dtype)
    cfg.optim.lr, cfg.optim.qk_clip.tau = lr, tau
    cfg.logging.post_step_max_logit = post_step
    trainer = Trainer(validate(cfg), tmp_path)
    records = []
    for _ in range(steps):
        records.append(trainer.train_step())
        trainer.step += 1
    return trainer, records


def test_qk_clip_acts_on_the_heads_over_tau_in_the_steps_forward(tmp_path):
    """K2's order in the trainer: each step clips the heads whose max logit in that step's forward
    (MAX over both micro-batches) was over tau, and logs that forward's max logits."""
    trainer = Trainer(small_cfg(steps=2, global_batch_size=8), tmp_path)
    trainer.cfg.optim.qk_clip.tau = trainer.optimizer.tau = 0.05
    seen = []
    step = trainer.optimizer.step

    def spy(*args, **kwargs):
        seen.append([layer.max_logits.clone() for layer in trainer.model.attention_layers()])
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    record = trainer.train_step()
    assert record["max_logit_per_layer"] == [float(m.max()) for m in seen[0]]
    assert record["clipped_heads_per_layer"] == [int((m > 0.05).sum()) for m in seen[0]]
    assert record["clipped_heads"] > 0


def test_a_non_finite_max_logit_skips_the_step(tmp_path):
    """A NaN max logit with a finite loss: MuonClip refuses it before the update, the trainer skips
    the step (the parameters, the optimizer state and the expert biases unchanged) and goes on."""
    trainer = Trainer(small_cfg(steps=3), tmp_path)
    trainer.train_step()
    trainer.step += 1
    layer = trainer.model.attention_layers()[1]
    forward = layer.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        layer.max_logits = torch.full_like(layer.max_logits, math.nan)
        return out

    layer.forward = poisoned
    before = [p.detach().clone() for p in trainer.model.parameters()]
    state = {k: v.clone() for k, v in trainer.optimizer.state[next(trainer.model.parameters())].items()}
    biases = [m.gate.e_score_correction_bias.clone() for m in trainer.model.moe_layers()]
    with pytest.warns(UserWarning, match=r"step 2: non-finite max logit .*non-finite max logit nan.* step skipped"):
        record = trainer.train_step()
    assert record["skipped"] and math.isfinite(record["loss"]) and trainer.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    now = trainer.optimizer.state[next(trainer.model.parameters())]
    assert all(torch.equal(state[k], now[k]) for k in state)
    assert all(torch.equal(b, m.gate.e_score_correction_bias) for b, m in zip(biases, trainer.model.moe_layers()))
    assert all(m.max_logits is None for m in trainer.model.attention_layers())
    layer.forward = forward
    trainer.step += 1
    assert not trainer.train_step().get("skipped")


@pytest.mark.gpu
def test_qk_clip_in_the_trainer_on_cuda_with_bf16(tmp_path):
    """On CUDA with bf16 autocast (Triton max-logit kernel, bf16 NS): the clip fires and, with a
    negligible update, layer 0's post-step max logit on the step's batch is tau to bf16 rounding."""
    trainer, records = _clip_run(tmp_path, steps=3, tau=0.02, dtype="bf16", lr=1e-12, post_step=True)
    assert trainer.device.type == "cuda"
    assert all(r["clipped_heads"] > 0 for r in records[:1])
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[0]["max_logit_post_step_per_layer"][0] == pytest.approx(0.02, rel=2e-2)


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
    counts = [m.routed_counts().clone() for m in trainer.model.moe_layers()]
    assert sum(float(c.sum()) for c in counts) > 0
    trainer._post_step_max_logits(micro_batches)
    assert all(torch.equal(c, m.routed_counts()) for c, m in zip(counts, trainer.model.moe_layers()))


def test_the_chunked_loss_trains_like_the_full_logits(tmp_path):
    """model.loss_chunk_tokens=50 (a 4 x 32-token micro-batch is 2.56 chunks) against 0 (the full
    logits): every step's loss and the validation loss to 1e-6 relative (measured: 3e-7), the grad
    norm to 1e-6 at step 1 (measured: 8e-8), 1e-5 after Muon has amplified the rounding (1.1e-6)."""
    records, val = {}, {}
    for chunk in (0, 50):
        cfg = small_cfg(steps=3)
        cfg.model.loss_chunk_tokens = chunk
        trainer = Trainer(validate(cfg), tmp_path / str(chunk))
        assert trainer.module.lm_head.loss_chunk_tokens == chunk
        records[chunk] = [trainer.train_step() for _ in range(3)]
        val[chunk] = trainer.evaluate()
    for step, (plain, chunked) in enumerate(zip(records[0], records[50])):
        assert chunked["loss"] == pytest.approx(plain["loss"], rel=1e-6)
        assert chunked["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-6 if step == 0 else 1e-5)
    assert val[50] == pytest.approx(val[0], rel=1e-6)


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
    state = ckpt.load_checkpoint(good, trainer.engine)
    assert state["step"] == 2 and state["data"]["consumed"] == [0]
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
    model = load_model_from_run(tmp_path)
    for (n, a), b in zip(model.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="has no config.yaml"):
        load_model_from_run(tmp_path / "nothing")


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
    """train.compile=true: the same losses and max logits as eager (fp32, CPU) over a few steps, with
    the chunked loss (model.loss_chunk_tokens=50) in the compiled forward, also with selective
    activation checkpointing (compiled into the backward; the statistics' records are side effects
    taken once). Regression: the MoE's grouped GEMM used to hand fp32 to torch's grouped_mm, which
    compile rejects (bf16 only); a checkpointed layer fell back to eager."""
    from torch._dynamo.utils import counters

    steps, graphs = {}, {}
    for compiled, ac in ((False, "none"), (True, "none"), (True, "selective")):
        counters.clear()
        cfg = small_cfg(steps=3, compile=compiled, activation_checkpointing=ac)
        cfg.model.loss_chunk_tokens = 50
        trainer = Trainer(validate(cfg), tmp_path / f"{compiled}{ac}")
        steps[compiled, ac] = [trainer.train_step() for _ in range(3)]
        graphs[compiled, ac] = counters["stats"]["unique_graphs"]
    eager = steps[False, "none"]
    for key in ((True, "none"), (True, "selective")):
        assert [r["loss"] for r in steps[key]] == pytest.approx([r["loss"] for r in eager], rel=1e-4), key
        assert [r["max_logit"] for r in steps[key]] == pytest.approx([r["max_logit"] for r in eager], rel=1e-4), key
        assert graphs[key] > 0, key  # the compiled run really is
    assert graphs[False, "none"] == 0


@pytest.mark.gpu
def test_compiled_model_trains_like_eager_on_cuda_with_bf16(tmp_path):
    """train.compile=true on CUDA under bf16 autocast, where the compiled forward meets the Triton
    max-logit kernel and grouped_mm: the same losses and max logits as eager, to bf16 rounding."""
    from torch._dynamo.utils import counters

    records = {}
    for compiled in (False, True):
        counters.clear()
        trainer = Trainer(small_cfg(steps=3, compile=compiled, dtype="bf16"), tmp_path / str(compiled))
        assert trainer.device.type == "cuda"
        records[compiled] = [trainer.train_step() for _ in range(3)]
        assert (counters["stats"]["unique_graphs"] > 0) == compiled
    for eager, comp in zip(records[False], records[True]):
        assert comp["loss"] == pytest.approx(eager["loss"], rel=2e-2)
        assert comp["max_logit"] == pytest.approx(eager["max_logit"], rel=5e-2)


def test_metrics_logger_flattens_every_per_layer_list_for_wandb(tmp_path):
    from kimi_train.loop.metrics import MetricsLogger

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
                "max_logit_post_step_per_layer": [0.5, 3.0], "clipped_heads_per_layer": [0, 1], "skipped": None})
    logger.close()
    step, values = logger._wandb.logged[0]
    assert step == 3 and values == {
        "step": 3, "loss": 1.5, "max_logit": 2.0, "max_logit_per_layer/0": 1.0, "max_logit_per_layer/1": 2.0,
        "max_logit_post_step_per_layer/0": 0.5, "max_logit_post_step_per_layer/1": 3.0,
        "clipped_heads_per_layer/0": 0, "clipped_heads_per_layer/1": 1}
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["max_logit_per_layer"] == [1.0, 2.0]
