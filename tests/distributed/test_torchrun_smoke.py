"""`torchrun --nproc_per_node 2 -m kimi_train.train` end to end on CPU (gloo): FSDP 2 x EP 2, 2 steps.

Checks what only a real launch shows: every rank agrees on the run directory, only rank 0 writes
Hydra's files and the metrics, and a checkpoint lands; that the run matches one process on the
same global batch, including the post-step max-logit diagnostic, whose extra no-grad forward runs
through the sharded and expert-parallel model; and that every rank exits 0 and cleanly (no
traceback or C++ abort on its stderr, not even one that leaves the exit code at 0).
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
    common = [
        "train.steps=2", "train.seq_len=32", "train.val_every=0", "train.val_batches=1", "train.log_every=1",
        "data.max_bytes=100000", "logging.wandb=disabled", "logging.progress_bar=false", "logging.plots=false",
        "model.num_hidden_layers=2", "logging.post_step_max_logit=true", "optim.qk_clip.tau=0.15",
    ]
    # --redirects/--tee: each rank's stdout and stderr also land in <log_dir>/<run id>/attempt_0/<rank>/
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "--log-dir", str(tmp_path / "logs"),
           "--redirects", "3", "--tee", "3", "-m", "kimi_train.train",
           f"run_dir={run_dir}", "train.micro_batch_size=2", "parallel.ep=2", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    # torchrun exits 0 only when every rank did (a rank killed by a signal counts as a failure)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_ranks_exited_cleanly(tmp_path / "logs", world_size=2)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "ranks: 2" in proc.stdout + proc.stderr
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 2, steps  # one writer: no duplicated steps

    # the same global batch (2 ranks x 2 sequences) in one process: the same losses, max logits
    # before and after the step (QK-Clip fires at this tau) and clipped heads
    single = subprocess.run([sys.executable, "-m", "kimi_train.train", f"run_dir={tmp_path / 'one'}",
                             "train.micro_batch_size=4", *common],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ref = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    got, ref = [r for r in lines if "loss" in r], [r for r in ref if "loss" in r]
    assert sum(r["clipped_heads"] for r in ref) > 0
    for a, b in zip(got, ref, strict=True):
        assert a["clipped_heads_per_layer"] == b["clipped_heads_per_layer"]
        for key in ("loss", "max_logit", "max_logit_post_step"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (key, a[key], b[key])
    ckpt = run_dir / "checkpoints" / "step_00000002"
    assert (ckpt / "COMPLETE").is_file() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank


# What a rank prints when it dies badly: a Python traceback (also the ones Python prints and then
# ignores at exit, e.g. from an atexit handler or a __del__, which leave the exit code at 0) or
# std::terminate from a C++ thread (gloo's workers at interpreter exit: SIGABRT).
_UNCLEAN = ("Traceback (most recent call last)", "Exception ignored in", "terminate called", "Fatal Python error")


def _assert_ranks_exited_cleanly(log_dir, world_size: int) -> None:
    stderr_logs = sorted(log_dir.glob("*/attempt_0/*/stderr.log"))
    assert [p.parent.name for p in stderr_logs] == [str(r) for r in range(world_size)], stderr_logs
    for path in stderr_logs:
        text = path.read_text()
        bad = [marker for marker in _UNCLEAN if marker in text]
        assert not bad, f"rank {path.parent.name} exited uncleanly ({bad}):\n{text[-3000:]}"
