"""The launchers under stop signals and slow starts (CPU, gloo), as a cluster job meets them:

- one-time preparation (once_per_node) on a leader slower than the process group's timeouts: the
  other ranks wait outside any collective and the group is still whole afterwards;
- two "nodes" (two torchruns of one rank each, c10d rendezvous, --max-restarts=1, through
  launch/torchrun_node.sh) whose rank 0 prepares the data for longer than parallel.init_timeout_s:
  the job trains; then SIGTERM to one node's torchrun: every rank saves the same step once, both
  torchruns end (the other node's rank stops its own), and no node restarts;
- Ctrl-C (SIGINT to the process group) under launch/deepspeed.sh with parallel.engine=deepspeed:
  the ranks save, and the same command resumes and logs exactly what an uninterrupted run logs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from _ports import free_port

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
TIMING = {"tokens_per_s", "elapsed_s", "mfu"}
OVERRIDES = [
    "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
    "model.moe_intermediate_size=32", "model.num_attention_heads=2", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
    "train.seq_len=32", "train.micro_batch_size=2", "train.log_every=1", "train.val_every=0",
    "train.val_batches=1", "schedule.warmup_steps=2", "data.max_bytes=60000", "checkpoint.every=0",
    "logging.wandb=disabled", "logging.progress_bar=false", "logging.plots=false",
]  # fmt: skip


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **extra}
    for key in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "KIMI_TRAIN_DEBUG_KILL_AT"):
        env.pop(key, None)
    return env


def _steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def _wait_for_steps(run_dir: Path, n: int, procs: list[subprocess.Popen], deadline_s: float = 300) -> None:
    deadline = time.monotonic() + deadline_s
    while _steps_logged(run_dir) < n:
        assert all(p.poll() is None for p in procs), "a launcher ended before the signal"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


def _per_step(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _checkpoints(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def test_preparation_slower_than_every_timeout_is_waited_for_outside_any_collective(tmp_path):
    script = Path(__file__).with_name("_once_per_node_main.py")
    proc = subprocess.run(["torchrun", "--standalone", "--nproc-per-node", "2", str(script), "3", "6"],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count("all_reduce ok") == 2, proc.stdout


def test_two_nodes_slow_preparation_then_a_signal_to_one_node(tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    args = [f"run_dir={run_dir}", "train.steps=40", "parallel.init_timeout_s=5", *OVERRIDES]
    nodes = []
    for node in (0, 1):
        env = _env(NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RDZV_ID="two-nodes", NPROC_PER_NODE="1", MAX_RESTARTS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
                   KIMI_TRAIN_DEBUG_SLOW_PREPARE="8")  # rank 0 prepares for 8 s > init_timeout_s
        nodes.append(subprocess.Popen([str(LAUNCH / "torchrun_node.sh"), *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path))
    try:
        _wait_for_steps(run_dir, 3, nodes)
        nodes[1].send_signal(signal.SIGTERM)  # to node 1's torchrun, which forwards it to its rank
        # Node 0's rank hears of the stop from node 1, saves with it and asks its own torchrun to stop
        # (else that torchrun would count a success and wait 300 s in its exit barrier for node 1's).
        outputs = [p.communicate(timeout=180)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    joined = "\n".join(outputs)
    stopped = [line for line in joined.splitlines() if "kimi-train: stopped at step" in line]
    assert len(stopped) == 1, joined[-4000:]  # rank 0 says it
    step = int(stopped[0].split("stopped at step ")[1].split()[0].rstrip(";"))
    assert 3 <= step < 40
    rank0_node = 0 if "run_dir: " in outputs[0] else 1  # the nodes are ordered by host name, then pid
    assert ("(SIGTERM on another rank)" in stopped[0]) == (rank0_node == 0), (rank0_node, stopped)
    assert _checkpoints(run_dir) == [f"step_{step:08d}"], joined[-4000:]  # one save, by both ranks
    assert joined.count("run_dir: ") == 1, joined[-4000:]  # rank 0's header: one worker group, no restart
    assert "will restart worker group" not in joined, joined[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sessions"][-1]["stopped"] == "signal" and summary["steps"] == step


def test_ctrl_c_under_the_deepspeed_launcher_saves_and_resumes_exactly(tmp_path):
    pytest.importorskip("deepspeed")
    steps = 8
    args = ["train.steps=%d" % steps, "parallel.engine=deepspeed", "parallel.zero_stage=1", *OVERRIDES]
    env = _env(NUM_GPUS="2")
    launcher = [str(LAUNCH / "deepspeed.sh")]

    reference = subprocess.run([*launcher, f"run_dir={tmp_path / 'reference'}", *args], capture_output=True,
                               text=True, env=env, cwd=tmp_path, timeout=300)
    assert reference.returncode == 0, reference.stderr[-4000:]

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*launcher, f"run_dir={run_dir}", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path, start_new_session=True)
    try:
        _wait_for_steps(run_dir, 2, [proc])
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the launcher and every rank get SIGINT
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = [line for line in output.splitlines() if "kimi-train: stopped at step" in line]
    assert len(stopped) == 1 and "second SIGINT" not in output, output[-4000:]
    step = int(stopped[0].split("stopped at step ")[1].split(";")[0])
    assert step < steps and _checkpoints(run_dir) == [f"step_{step:08d}"], output[-4000:]

    resumed = subprocess.run([*launcher, f"run_dir={run_dir}", *args], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert _per_step(run_dir) == _per_step(tmp_path / "reference")


FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: one task (node 0) running the command after srun's options; SIGTERM is forwarded
while [[ "$1" == --* ]]; do echo "$1" >> "$FAKE_SLURM_LOG"; shift; done
SLURM_NODEID=0 "$@" &
task=$!
trap 'kill -TERM "$task"' TERM
wait "$task"; wait "$task"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol stand-in: the job's node list and command, and a requeue that is only recorded
case "$1 $2" in
  "show hostnames") echo 127.0.0.1 ;;
  "show job") echo "   Command=$FAKE_SBATCH_PATH" ;;
  "requeue $SLURM_JOB_ID") echo "requeue $SLURM_JOB_ID" >> "$FAKE_SLURM_LOG" ;;
  *) echo "fake scontrol: $*" >&2; exit 1 ;;
esac
"""


def test_slurm_script_stops_at_the_time_limit_signal_saves_exits_0_and_requeues(tmp_path):
    """launch/slurm.sbatch under stand-ins for srun and scontrol: USR1 (SLURM's --signal=B:USR1@120)
    reaches the batch script alone; it stops the step, which saves; the script exits 0 (the job ends
    COMPLETED, not FAILED) and, with KIMI_TRAIN_REQUEUE=1, requeues the job. The run is named after
    the job, as no run_name is given."""
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm.log"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_LOG=str(log),
               FAKE_SBATCH_PATH=str(LAUNCH / "slurm.sbatch"), SLURM_JOB_ID="4242", SLURM_JOB_NAME="kt",
               SLURM_NNODES="1", SLURM_JOB_NODELIST="node0", SLURM_CPUS_ON_NODE="2", NPROC_PER_NODE="1",
               MASTER_PORT=str(free_port()), KIMI_TRAIN_REQUEUE="1")
    run_dir = tmp_path / "runs" / "kt-4242"
    job = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "train.steps=40", *OVERRIDES],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        _wait_for_steps(run_dir, 2, [job])
        job.send_signal(signal.SIGUSR1)
        output, _ = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-4000:]
    assert "kimi-train: stopped on time-limit" in output, output[-4000:]
    step = json.loads((run_dir / "summary.json").read_text())["steps"]
    assert 2 <= step < 40 and _checkpoints(run_dir) == [f"step_{step:08d}"], output[-4000:]
    recorded = log.read_text().splitlines()
    assert "--cpus-per-task=2" in recorded and "requeue 4242" in recorded, recorded
