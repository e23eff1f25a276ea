"""The activation-memory figures' benchmarks run and compare like with like: train_bench's
checkpointing sweep trains the same numbers in every mode (only the time may differ), and
activation_memory_bench counts less for each mode that recomputes more, with the planner beside it."""

from __future__ import annotations

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, os.path.abspath(BENCH))

import activation_memory_bench  # noqa: E402
import train_bench  # noqa: E402


def test_train_bench_sweeps_checkpointing_with_the_same_losses(tmp_path):
    train_bench.main(["--quick", "--variants", "ours+adamw", "--activation-checkpointing", "none,full",
                      "--json", str(tmp_path / "t.json")])
    report = json.loads((tmp_path / "t.json").read_text())
    by = {r["variant"]: r for r in report["results"]}
    assert set(by) == {"ours+adamw ac=none", "ours+adamw ac=full"}
    assert by["ours+adamw ac=full"]["first_loss"] == by["ours+adamw ac=none"]["first_loss"]
    assert by["ours+adamw ac=full"]["last_loss"] == by["ours+adamw ac=none"]["last_loss"]  # after AdamW steps
    assert "ours+adamw ac=full vs ac=none step_time" in report["ratios"]


def test_activation_memory_bench_counts_less_per_mode_and_shows_the_planner(tmp_path):
    activation_memory_bench.main(["--models", "tiny", "--seq", "64", "--json", str(tmp_path / "m.json")])
    row = json.loads((tmp_path / "m.json").read_text())["results"][0]
    moe = row["layers"]["MoE layer"]
    assert moe["full"] < moe["selective+down"] < moe["selective"] < moe["none"]
    assert row["logits_path"]["chunked"] < row["logits_path"]["plain"]
    planned = row["planner"]["MoE layer"]
    for mode, counted in moe.items():
        assert planned[mode] == pytest.approx(counted, rel=0.1), mode
