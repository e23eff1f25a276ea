"""The real Trainer on a two-source mixture of prepared data: val_loss equal at dp=1 and dp=2, and a run
stopped on 2 ranks resumes on 1 rank (same global batch) with the uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_train.config import DataConfig
from kimi_train.data.prepare import prepare
from kimi_train.data.tokenizer import ByteTokenizer

OVERRIDES = [
    "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
    "model.moe_intermediate_size=32", "model.num_attention_heads=2", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16", "optim.ns_dtype=fp32",
    "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=6",
    "train.log_every=1", "train.val_every=3", "data.val_sequences=12", "schedule.warmup_steps=2",
    "logging.wandb=disabled", "logging.progress_bar=false", "logging.plots=false",
]  # fmt: skip


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_mixture_val_loss_and_resume_across_data_parallel_sizes(tmp_path):
    from kimi_train.data import stdlib_files

    texts = [p.read_text(errors="replace") for p in stdlib_files()[:40]]
    mixes = []
    for name, docs in (("code", texts[:30]), ("prose", [t.replace("def ", "so ") for t in texts[30:]])):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        prepare(DataConfig(source="files", paths=[str(src)], max_bytes=0), tmp_path / name, ByteTokenizer(),
                progress=False)
        mixes.append(f"{{path:{tmp_path / name},weight:{3 if name == 'code' else 1}}}")
    args = ["data=prepared", f"data.mix=[{','.join(mixes)}]", *OVERRIDES]

    one = tmp_path / "one"
    ref = subprocess.run([sys.executable, "-m", "kimi_train.train", f"run_dir={one}", *args], capture_output=True,
                         text=True, timeout=300, env=_env())
    assert ref.returncode == 0, ref.stderr[-3000:]
    two = tmp_path / "two"
    torchrun = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "kimi_train.train", f"run_dir={two}", *args]
    stopped = subprocess.run(torchrun, capture_output=True, text=True, timeout=300,
                             env=_env(KIMI_TRAIN_DEBUG_KILL_AT="0:5:TERM"))  # finishes step 5, saves, stops
    assert stopped.returncode != 0 and "step 5" in stopped.stderr, stopped.stderr[-3000:]
    resumed = subprocess.run([sys.executable, "-m", "kimi_train.train", f"run_dir={two}", *args], capture_output=True,
                             text=True, timeout=300, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = _metrics(one), _metrics(two)
    assert sorted(b) == list(range(1, 7))
    assert b[3]["val_loss"] == pytest.approx(a[3]["val_loss"], rel=1e-5)  # dp=2 vs dp=1, same weights up to sums
    for step in range(1, 7):  # steps 1-5 on 2 ranks, 6 on 1 rank after the resume
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4), step
    assert b[6]["val_loss"] == pytest.approx(a[6]["val_loss"], rel=1e-4)
    tokens = {k.split("/", 1)[1]: v for k, v in b[6].items() if k.startswith("data_tokens/")}
    assert tokens == {str(tmp_path / "code"): 6 * 6 * 32, str(tmp_path / "prose"): 6 * 2 * 32}  # 3:1 of 6 x 8 x 32
    assert json.loads((two / "summary.json").read_text())["data_tokens"] == tokens
