"""Shared helpers for the trainer tests: a very small model and a fast corpus, via CLI overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# 2 layers (1 dense + 1 MoE), 64 wide, seq 32: a CPU step takes milliseconds.
SMALL = [
    "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
    "model.moe_intermediate_size=32", "model.num_attention_heads=2", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
    "train.seq_len=32", "train.micro_batch_size=4", "train.log_every=1", "train.val_every=10",
    "train.val_batches=2", "schedule.warmup_steps=3", "data.max_bytes=200000",
    "logging.wandb=disabled", "logging.progress_bar=false", "logging.plots=false",
]  # fmt: skip


def run_cli(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "kimi_train.train", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def small_overrides() -> list[str]:
    return list(SMALL)
