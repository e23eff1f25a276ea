"""benchmarks/gpu_kernels.py --cpu-smoke: the GPU benchmark script runs end to end and writes its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_smoke_run(tmp_path):
    pytest.importorskip("triton")  # the subprocess sets TRITON_INTERPRET=1 itself
    out = tmp_path / "gpu_kernels.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_kernels.py"), "--cpu-smoke", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    for section in ("ns", "grouped_mlp", "max_logits"):
        assert "error" not in results[section], results[section]
    # Every variant produced a timing (a failed variant records None and an *_error key).
    rows = results["ns"] + results["max_logits"] + [results["grouped_mlp"]]
    assert not [k for r in rows for k in r if k.endswith("_error")], rows
    assert all(r["triton_ms"] > 0 for r in results["ns"] + results["max_logits"])
    assert len(results["acceptance"]) == 4
    assert "## acceptance" in proc.stdout
