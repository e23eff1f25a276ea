"""`torchrun --nproc_per_node 2 -m kimi_train.train` end to end on CPU (gloo): FSDP 2 x EP 2, 2 steps.

Checks what only a real launch shows: every rank agrees on the run directory, only rank 0 writes
Hydra's files and the metrics, and a checkpoint lands. The post-step max-logit diagnostic is on,
so its extra no-grad forward runs through the sharded and expert-parallel model too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_ranks(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        "torchrun", "--standalone", "--nproc_per_node", "2", "-m", "kimi_train.train",
        f"run_dir={run_dir}", "train.steps=2", "train.seq_len=32", "train.micro_batch_size=2",
        "train.val_every=0", "train.val_batches=1", "train.log_every=1", "data.max_bytes=100000",
        "logging.wandb=disabled", "logging.progress_bar=false", "logging.plots=false",
        "model.num_hidden_layers=2", "parallel.ep=2", "logging.post_step_max_logit=true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "ranks: 2" in proc.stdout + proc.stderr
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 2, steps  # one writer: no duplicated steps
    assert all(0 < r["max_logit_post_step"] < float("inf") for r in lines if "loss" in r)
    ckpt = run_dir / "checkpoints" / "step_00000002"
    assert (ckpt / "COMPLETE").is_file() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
