"""benchmarks/gpu_train_bench.py --cpu-smoke: every variant of the GPU training benchmark runs a
step on CPU (tiny k2_mini-shaped models) and the JSON has what the device run will report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BREAKDOWN = {"forward", "backward", "grad_norm", "optimizer", "max_logit_capture", "clip", "other"}


def test_cpu_smoke_run(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "train_bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_train_bench.py"), "--cpu-smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["matmul"]["flops_per_s"] > 0
    rows = {}
    for section in ("k2_mini", "compile", "dense", "small_batch"):
        assert results[section]["flops_per_token"] > 0, results[section]
        for row in results[section]["variants"]:
            assert "step_ms" in row, row  # neither an error nor skipped
            rows[section, row["variant"]] = row
    assert {v for s, v in rows if s == "k2_mini"} == {
        "ours+adamw", "ours+muonclip", "ours+muon-nocapture", "hf+adamw", "ours+adamw/bf16", "hf+adamw/bf16"}
    assert [v for s, v in rows if s == "compile"] == ["ours+muonclip+compile"]
    for (section, variant), row in rows.items():
        assert set(row["breakdown_ms"]) == BREAKDOWN, (variant, row["breakdown_ms"])
        tokens = results[section]["tokens_per_step"]
        assert tokens == results[section]["micro_batch"] * results[section]["accumulation"] * results[section]["seq"]
        assert row["tokens_per_s"] == pytest.approx(tokens / (row["step_ms"] / 1000))
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * results[section]["flops_per_token"] / 989e12)
        assert row["mfu_vs_measured_matmul"] > 0
        assert row["breakdown_ms"]["forward"] > 0 and row["breakdown_ms"]["backward"] > 0
    k2 = {v: r for (s, v), r in rows.items() if s in ("k2_mini", "compile")}
    # The capture is timed where it runs (eager, ours, capture on) and only there; QK-Clip only under MuonClip.
    assert k2["ours+muonclip"]["breakdown_ms"]["max_logit_capture"] > 0
    assert k2["ours+muonclip"]["breakdown_ms"]["clip"] > 0
    assert k2["ours+muon-nocapture"]["breakdown_ms"]["max_logit_capture"] is None
    assert k2["ours+muonclip+compile"]["breakdown_ms"]["max_logit_capture"] is None
    assert k2["ours+adamw"]["breakdown_ms"]["clip"] == 0
    # Same weights and batch: transformers' model (loaded from our export) starts at our loss, and
    # the variants that differ only in optimizer share the first step's loss up to dtype rounding.
    assert k2["hf+adamw"]["loss"] == pytest.approx(k2["ours+adamw"]["loss"], rel=1e-4)
    assert k2["hf+adamw/bf16"]["param_dtype"] == "bf16" and k2["ours+adamw/bf16"]["param_dtype"] == "bf16"
    assert results["small_batch"]["tokens_per_step"] < results["k2_mini"]["tokens_per_step"]
    assert results["dense"]["flops_per_token"] < results["k2_mini"]["flops_per_token"] * 10
    for key in ("muonclip step / adamw step", "capture + clip share of the muonclip step",
                "ours compiled (muonclip) / hf best tokens/s"):
        assert f"k2_mini: {key}" in results["ratios"], results["ratios"]
    assert "## k2_mini" in proc.stdout


def test_a_section_runs_in_its_own_process_within_its_limit():
    """On the GPU every section runs in a subprocess (the smoke above runs them in-process): the
    arguments reach it, its JSON comes back, and a section past its deadline skips its variants
    instead of starting them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_train_bench

    args = gpu_train_bench.parse_args(["--cpu-smoke"])
    args.device, args.compile_backend = "cpu", "eager"
    done = gpu_train_bench.run_isolated("matmul", args, timeout_s=300)
    assert done["n"] == 256 and done["flops_per_s"] > 0, done  # --cpu-smoke reached it
    # The deadline is the limit less 10 s, and the smoke starts no variant with < 10 s left: with an
    # 18 s limit none starts, while the process has 18 s to start and report.
    late = gpu_train_bench.run_isolated("small_batch", args, timeout_s=18)
    assert [r["skipped"].startswith("section time limit") for r in late["variants"]] == [True], late
