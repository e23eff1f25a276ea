"""`torchrun --nproc_per_node 1 -m kimi_train.train`: one rank still runs the distributed path.

A process group (gloo on CPU, NCCL on CUDA), FSDP2 over a 1-rank mesh (bf16 mixed precision on
CUDA), DCP checkpoints: the run is stopped by SIGTERM at step 2 (it saves and exits), the same
command resumes it and finishes. On CUDA the Triton kernels are forced into the loop: Newton-
Schulz (optim.ns_backend=triton), the grouped expert GEMM (KIMI_TRAIN_GROUPED_GEMM=triton) and
the max-logit kernel (the CUDA default), at k2_mini's dims (hidden 1024, q.k 192, experts 288).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest

from _torchrun import env

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")

COMMON = ["train.steps=4", "checkpoint.every=2", "train.log_every=1", "train.val_every=0", "train.val_batches=1",
          "logging.wandb=disabled", "logging.progress_bar=false", "logging.plots=false"]
CPU = ["model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
       "model.moe_intermediate_size=32", "model.num_attention_heads=2", "model.kv_lora_rank=16",
       "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16", "train.seq_len=32",
       "train.micro_batch_size=2", "data.max_bytes=100000"]
GPU = ["model=k2_mini", "model.num_hidden_layers=2", "train.seq_len=512", "train.micro_batch_size=4",
       "train.dtype=bf16", "optim.ns_backend=triton", "data.max_bytes=400000"]


def _launch(run_dir, overrides, extra_env=None) -> subprocess.CompletedProcess:
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "1", "-m", "kimi_train.train", f"run_dir={run_dir}",
           *COMMON, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env(extra_env), cwd=run_dir.parent)


def _stop_and_resume(tmp_path, overrides, backend: str, extra_env=None) -> list[dict]:
    run_dir = tmp_path / "run"
    first = _launch(run_dir, overrides, {"KIMI_TRAIN_DEBUG_KILL_AT": "0:2:TERM", **(extra_env or {})})
    out = first.stdout + first.stderr
    assert first.returncode != 0 and "stopped at step 2" in out, out[-3000:]
    assert f"ranks: 1 ({backend}, FSDP2)" in out, out[-3000:]
    saved = run_dir / "checkpoints" / "step_00000002"
    assert (saved / "COMPLETE").is_file() and list(saved.glob("*.distcp")), sorted(run_dir.rglob("*"))

    second = _launch(run_dir, overrides, extra_env)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "resumed from step_00000002" in second.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # one record per step across the two sessions
    assert all(math.isfinite(r["loss"]) and r["max_logit"] is not None for r in records)
    assert (run_dir / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    return records


def test_one_rank_torchrun_on_cpu_is_fsdp_with_a_process_group_and_resumes(tmp_path):
    _stop_and_resume(tmp_path, CPU, "gloo")


@pytest.mark.gpu
def test_one_rank_torchrun_on_cuda_nccl_fsdp_bf16_triton_kernels_resumes(tmp_path):
    records = _stop_and_resume(tmp_path, GPU, "nccl", {"KIMI_TRAIN_GROUPED_GEMM": "triton"})
    assert records[-1]["loss"] < records[0]["loss"] + 0.5  # bf16 training moves, and not off a cliff
