"""Pipeline parallelism through the real Trainer equals one process step by step.

tiny, MuonClip, ns_dtype fp32, tau 0.15 (it clips), 6 steps, the same global batch (8 sequences of
32 tokens), with validation every 3 steps and the post-step max-logit diagnostic:

- 2 gloo ranks, parallel.pp=2, under 1F1B and under Interleaved1F1B (2 stages per rank);
- 4 ranks, pp=2 x dp_shard=2, pp=2 x ep=2 (EP borrows dp_shard=2), and pp=2 x dp_replicate=2;

per-step loss, grad norm, max logit (per layer too), validation loss and post-step max logit
within 1e-5 relative, clipped heads and expert load per layer equal. Also: the 1F1B run's step-3
checkpoint resumes at PP=1 and continues like the uninterrupted run (and exports the same weights);
activation checkpointing composes with the stages; a non-finite max logit or loss on one stage
skips the step on every stage (no parameter or optimizer state changes anywhere); SIGTERM under torchrun at
PP=2 exits 143 and the same command continues exactly.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import _torchrun
from _spawn import spawn
from kimi_train.config import (CheckpointConfig, DataConfig, LoggingConfig, OptimConfig, ParallelConfig, QKClipConfig,
                               TrainConfig, TrainLoopConfig, validate)  # fmt: skip
from kimi_train.model import load_model_config

STEPS = 6
CLOSE = ("loss", "grad_norm", "max_logit", "val_loss", "max_logit_post_step")
EQUAL = ("clipped_heads_per_layer", "expert_load_imbalance_per_layer")


def config(parallel: dict, world: int, steps: int = STEPS, every: int = 0, **train) -> TrainConfig:
    cfg = TrainConfig(
        model=load_model_config("tiny"),
        optim=OptimConfig(name="muonclip", lr=0.02, ns_dtype="fp32", ns_backend="torch", grad_clip=1.0,
                          qk_clip=QKClipConfig(tau=0.15)),
        train=TrainLoopConfig(steps=steps, seq_len=32, micro_batch_size=2, global_batch_size=8, log_every=1,
                              val_every=3, val_batches=2, dtype="fp32", **train),
        # 7 validation windows: a short last batch (and, at dp 2, one rank with fewer) pads the pipeline's
        data=DataConfig(max_bytes=60_000, val_sequences=7), parallel=ParallelConfig(**parallel),
        checkpoint=CheckpointConfig(every=every),
        logging=LoggingConfig(wandb="disabled", progress_bar=False, plots=False, post_step_max_logit=True),
    )  # fmt: skip
    return validate(cfg, dp_size=world // parallel.get("pp", 1))


def _steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_close(got: list[dict], want: list[dict], first: int = 1) -> None:
    assert [r["step"] for r in got] == list(range(first, STEPS + 1))
    assert sum(r["clipped_heads"] for r in want) > 0  # QK-Clip fires: the clipped heads are compared, not all 0
    for g, w in zip(got, want[first - 1:]):
        assert not g.get("skipped"), g
        for key in CLOSE:
            if w.get(key) is None:
                assert g.get(key) is None, (w["step"], key)
                continue
            assert math.isclose(g[key], w[key], rel_tol=1e-5), (w["step"], key, g[key], w[key])
        for a, b in zip(g["max_logit_per_layer"], w["max_logit_per_layer"], strict=True):
            assert math.isclose(a, b, rel_tol=1e-5), (w["step"], g["max_logit_per_layer"], w["max_logit_per_layer"])
        for key in EQUAL:
            assert g[key] == w[key], (w["step"], key, g[key], w[key])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    from kimi_train.loop.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("pp_reference")
    Trainer(config({}, 1), run_dir).fit()
    return _steps(run_dir)


# ------------------------------------------------------------------------------------------ 2 ranks
def _params_and_state(trainer) -> dict:
    local = [(n, p.detach()) for n, p in trainer.module.named_parameters()]
    local += [(f"{i}.{k}", v) for i, s in enumerate(trainer.engine.optimizer.state.values()) for k, v in s.items()
              if torch.is_tensor(v)]
    return {n: (t.to_local() if hasattr(t, "to_local") else t).clone() for n, t in local}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, a NaN where the other has a NaN included (the planted one)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _skips_on_one_stage(root: Path) -> list[dict]:
    """Step 2: a non-finite max logit on pp rank 0's layers only; step 3: a non-finite loss (a NaN
    in lm_head on the last stage). Every stage skips both: no parameter or optimizer state changes."""
    from kimi_train.loop.trainer import Trainer
    from optim import NonFiniteMaxLogit

    trainer = Trainer(config({"pp": 2}, 2, steps=3), root / "skip")
    trainer.train_step()
    trainer.step += 1
    opt, first = trainer.engine.optimizer, trainer.dims.pp_rank == 0
    prepare = opt.prepare_qk_clip
    if first:
        def poisoned(*args, **kwargs):
            raise NonFiniteMaxLogit("planted: layers.0.self_attn max logit nan")
        opt.prepare_qk_clip = poisoned
    out = []
    for step in (2, 3):
        if step == 3:
            opt.prepare_qk_clip = prepare
            if not first:
                with torch.no_grad():
                    trainer.module.lm_head.weight.to_local()[0, 0] = float("nan")
        before = _params_and_state(trainer)
        record = trainer.train_step()
        trainer.step += 1
        after = _params_and_state(trainer)
        out.append({"step": step, "skipped": bool(record.get("skipped")), "loss": record["loss"], "tensors": len(before),
                    "changed": [n for n in before if not _same(before[n], after[n])]})
    return out


def _two_ranks(rank: int, world: int, root: str) -> dict:
    from kimi_train.loop.trainer import Trainer

    root = Path(root)
    Trainer(config({"pp": 2}, world, every=3), root / "1F1B").fit()
    Trainer(config({"pp": 2, "pp_schedule": "Interleaved1F1B"}, world), root / "interleaved").fit()
    Trainer(config({"pp": 2}, world, activation_checkpointing="full"), root / "recompute").fit()
    return _skips_on_one_stage(root)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("pp2")
    return root, spawn(_two_ranks, 2, str(root), timeout_s=240)


def test_pp2_1f1b_equals_one_process(two_ranks, reference):
    root, _ = two_ranks
    _assert_close(_steps(root / "1F1B"), reference)


def test_pp2_interleaved_equals_one_process(two_ranks, reference):
    root, _ = two_ranks
    _assert_close(_steps(root / "interleaved"), reference)


def test_pp2_with_activation_checkpointing_equals_one_process(two_ranks, reference):
    root, _ = two_ranks
    _assert_close(_steps(root / "recompute"), reference)


def test_a_non_finite_value_on_one_stage_skips_the_step_on_every_stage(two_ranks):
    _, results = two_ranks
    for rank, steps in enumerate(results):
        for r in steps:
            assert r["skipped"], (rank, r)
            assert r["tensors"] > 0 and r["changed"] == [], (rank, r)
        assert math.isnan(steps[1]["loss"]), steps  # every rank logs the last stage's loss


def test_a_pp2_checkpoint_resumes_at_pp1(two_ranks, reference, tmp_path):
    """The 1F1B run's step-3 checkpoint, resumed by one process (parallel.* may change on resume)."""
    from kimi_train.loop import checkpoint as ckpt
    from kimi_train.loop.trainer import Trainer

    root, _ = two_ranks
    run_dir = tmp_path / "run"
    shutil.copytree(root / "1F1B", run_dir)
    shutil.rmtree(ckpt.checkpoint_path(run_dir, STEPS))
    trainer = Trainer(config({}, 1), run_dir)
    assert trainer.step == 3 and trainer.resumed_from.endswith("step_00000003")
    # What kimi-train-export reads from the PP checkpoint is the model the resumed run holds, under
    # every name of the whole model.
    from kimi_train.tools.run_model import load_model_from_run

    exported = load_model_from_run(run_dir, step=3).state_dict()
    resumed = trainer.module.state_dict()
    assert exported.keys() == resumed.keys() and any(".layers.3." in k for k in exported)
    assert all(torch.equal(exported[k], resumed[k]) for k in exported)
    trainer.fit()
    _assert_close(_steps(run_dir)[3:], reference, first=4)


# ------------------------------------------------------------------------------------------ 4 ranks
def _four_ranks(rank: int, world: int, root: str) -> None:
    from kimi_train.loop.trainer import Trainer

    Trainer(config({"pp": 2, "dp_shard": 2}, world), Path(root) / "dp2").fit()
    Trainer(config({"pp": 2, "dp_shard": 2, "ep": 2}, world), Path(root) / "ep2").fit()
    Trainer(config({"pp": 2, "dp_replicate": 2, "dp_shard": 1}, world), Path(root) / "hsdp2").fit()


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pp2x2")
    spawn(_four_ranks, 4, str(root), timeout_s=300)
    return root


@pytest.mark.parametrize("layout", ["dp2", "ep2", "hsdp2"])
def test_pp2_with_data_and_expert_parallelism_equals_one_process(four_ranks, reference, layout):
    _assert_close(_steps(four_ranks / layout), reference)


# ------------------------------------------------------------------------------------------ SIGTERM
PP_OVERRIDES = [o for o in _torchrun.OVERRIDES if not o.startswith(("train.steps=", "checkpoint.every="))] + [
    "parallel.pp=2", "train.steps=6", "checkpoint.every=0"]


def _torchrun_pp(run_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    command = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "kimi_train.train", f"run_dir={run_dir}",
               *PP_OVERRIDES]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=_torchrun.env(env),
                          cwd=run_dir.parent)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_sigterm_under_pp2_exits_143_and_the_same_command_continues_exactly(tmp_path):
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    done = _torchrun_pp(reference_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    # rank 0 (the first stage) gets SIGTERM as it starts step 3: both ranks finish the step and save
    # it; rank 0 exits 143 (torchrun reports it), rank 1, which only heard of it, exits 0
    stopped = _torchrun_pp(run_dir, {"KIMI_TRAIN_DEBUG_KILL_AT": "0:3:TERM"})
    output = stopped.stdout + stopped.stderr
    assert re.search(r"rank\s*: 0 .*\n\s*exitcode\s*: 143", output), output[-3000:]
    assert "kimi-train: stopped at step 3; run the same command to resume" in output, output[-3000:]
    from kimi_train.loop import checkpoint as ckpt

    assert ckpt.latest_checkpoint(run_dir) == ckpt.checkpoint_path(run_dir, 3)
    resumed = _torchrun_pp(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step_00000003" in resumed.stdout + resumed.stderr
    assert _torchrun.per_step(run_dir) == _torchrun.per_step(reference_dir)
