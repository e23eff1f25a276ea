"""SIGTERM under 2 ranks: every rank stops after the same step and saves it.

- one rank signalled (the other never is): both stop at that step, one checkpoint of 2 shards;
- SIGTERM to torchrun, which forwards it to each worker in turn (slow): the workers exit 143
  after saving a step at or after the one the signal was sent at, and the same command resumes
  from it and logs exactly what the uninterrupted run logs.
"""

from __future__ import annotations

import faulthandler
import json
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch

import _torchrun
from _spawn import spawn


def _worker(rank: int, world_size: int, run_dir: str, out: str) -> None:
    from kimi_train.config import (CheckpointConfig, DataConfig, LoggingConfig, ScheduleConfig, TrainConfig,
                                   TrainLoopConfig, validate)
    from kimi_train.errors import Interrupted
    from kimi_train.loop.trainer import Trainer
    from kimi_train.model.config import ModelConfig

    model = ModelConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2)
    cfg = TrainConfig(model=model, train=TrainLoopConfig(steps=6, seq_len=32, micro_batch_size=2, log_every=1,
                                                         val_every=0, val_batches=1, dtype="fp32"),
                      schedule=ScheduleConfig(warmup_steps=0), data=DataConfig(max_bytes=60_000),
                      checkpoint=CheckpointConfig(every=0, keep=1),
                      logging=LoggingConfig(wandb="disabled", progress_bar=False, plots=False))
    trainer = Trainer(validate(cfg, dp_size=2), run_dir)
    faulthandler.dump_traceback_later(180, exit=True)  # ranks that stop at different steps hang: fail instead
    try:
        trainer.fit()
        result = {"finished": trainer.step}
    except Interrupted as e:
        result = {"exit_code": e.exit_code, "message": str(e), "step": trainer.step}
    faulthandler.cancel_dump_traceback_later()
    torch.save(result, f"{out}/rank{rank}.pt")


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, monkeypatch):
    from kimi_train.loop import checkpoint as ckpt

    monkeypatch.setenv("KIMI_TRAIN_DEBUG_KILL_AT", "1:3:TERM")  # rank 1 only, while step 3 runs
    spawn(_worker, 2, str(tmp_path / "run"), str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # rank 1 got the signal (exit 143); rank 0 heard of it from rank 1 (exit 0: a launcher must not restart it)
    assert results == [
        {"exit_code": 0, "message": "stopped at step 3 (SIGTERM on another rank); run the same command to resume",
         "step": 3},
        {"exit_code": 143, "message": "stopped at step 3; run the same command to resume", "step": 3}]
    assert ckpt.latest_checkpoint(tmp_path / "run") == ckpt.checkpoint_path(tmp_path / "run", 3)
    assert len(list(ckpt.checkpoint_path(tmp_path / "run", 3).glob("*.distcp"))) == 2  # both ranks saved


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_sigterm_to_torchrun_saves_and_the_same_command_resumes_exactly(tmp_path, tmp_path_factory):
    reference = _torchrun.reference(tmp_path_factory)
    run_dir, send_at = tmp_path / "run", random.randint(2, 8)  # seeded: tests/conftest.py
    proc = subprocess.Popen(_torchrun.command(run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_torchrun.env(), cwd=tmp_path)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= send_at):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    stopped = [int(line.split("stopped at step ")[1].split(";")[0]) for line in output.splitlines()
               if "kimi-train: stopped at step" in line]
    # rank 0 says it (every rank stops: the checkpoint below holds both ranks' shards); torchrun
    # itself exits 1 with its SignalException traceback
    assert len(stopped) == 1, output[-3000:]
    stop_at = stopped[0]
    assert send_at <= stop_at < _torchrun.STEPS, (send_at, stop_at)
    assert "exitcode: 143" not in output and proc.returncode != 0  # torchrun did not report a worker failure
    from kimi_train.loop import checkpoint as ckpt

    assert ckpt.latest_checkpoint(run_dir) == ckpt.checkpoint_path(run_dir, stop_at)
    assert len(list(ckpt.checkpoint_path(run_dir, stop_at).glob("*.distcp"))) == 2  # both ranks saved it

    resumed = _torchrun.run(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step_{stop_at:08d}")
    assert _torchrun.per_step(run_dir) == reference, (send_at, stop_at)
