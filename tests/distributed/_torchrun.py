"""`torchrun --nproc_per_node 2 -m kimi_train.train` on CPU for the stop/restart tests, and the
uninterrupted run they compare with (run once per test session, 20 steps, checkpoint every 5).

Ports: `torchrun --standalone` binds its rendezvous store to port 0 itself and, by default, lends
that store to the workers, so no port is ever picked and handed out. Only a run with restarts
sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (test_elastic_restart.py says why); torch then picks
the workers' port by binding and closing a socket, the race its own docs note, so that test
retries a run that failed in torch's rendezvous (RENDEZVOUS_RACES) once.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Optional

STEPS, EVERY = 20, 5
OVERRIDES = [
    "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
    "model.moe_intermediate_size=32", "model.num_attention_heads=2", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
    "train.seq_len=32", "train.micro_batch_size=2", "train.log_every=1", "train.val_every=10",
    "train.val_batches=1", "schedule.warmup_steps=3", "data.max_bytes=100000",
    f"train.steps={STEPS}", f"checkpoint.every={EVERY}",
    "logging.wandb=disabled", "logging.progress_bar=false", "logging.plots=false",
]  # fmt: skip
TIMING = {"tokens_per_s", "elapsed_s", "mfu"}  # the only fields allowed to differ between runs
# torch-side rendezvous failures before any kimi-train code runs: the restarted round's gloo connect
# (see test_elastic_restart.py), and a port torch picked that another process took meanwhile
RENDEZVOUS_RACES = ("connectFullMesh failed", "EADDRINUSE", "Address already in use")
_reference: dict[str, list[dict]] = {}


def command(run_dir: Path, max_restarts: int = 0) -> list[str]:
    return ["torchrun", "--standalone", "--nproc_per_node", "2", f"--max-restarts={max_restarts}",
            "-m", "kimi_train.train", f"run_dir={run_dir}", *OVERRIDES]


def env(extra: Optional[dict] = None, restarts: bool = False) -> dict:
    """The workers' environment; restarts: a fresh rendezvous store per round (see the module docstring)."""
    out = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(extra or {})}
    out.pop("HYDRA_FULL_ERROR", None)
    out.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    if restarts:
        out["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return out


def run(run_dir: Path, max_restarts: int = 0, extra_env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, max_restarts), capture_output=True, text=True, timeout=600,
                          env=env(extra_env, restarts=max_restarts > 0), cwd=run_dir.parent)


def per_step(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def reference(tmp_path_factory) -> list[dict]:
    """The per-step metrics of the uninterrupted run (computed once per session)."""
    if "metrics" not in _reference:
        run_dir = tmp_path_factory.mktemp("reference") / "run"
        proc = run(run_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _reference["metrics"] = per_step(run_dir)
        assert [r["step"] for r in _reference["metrics"]] == list(range(1, STEPS + 1))
    return _reference["metrics"]
