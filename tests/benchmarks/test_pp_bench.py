"""benchmarks/pp_bench.py --smoke runs every layout and measures what it claims: a finite step
time per layout; a bubble in (0, 1) per pipeline layout, from the stages' compute timed inside the
schedule (every forward and backward chunk counted), and none for the one-process reference; the
textbook bubble of each schedule; the same first loss everywhere (same model, same global batch).

Timings are not asserted against each other (figures, see docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, os.path.abspath(BENCH))

import pp_bench  # noqa: E402


def test_pp_bench_smoke_measures_every_layout(tmp_path):
    pp_bench.main(["--smoke", "--json", str(tmp_path / "pp.json")])
    report = json.loads((tmp_path / "pp.json").read_text())
    rows = {r["layout"]: r for r in report["results"]}
    assert list(rows) == list(pp_bench.LAYOUTS) and len(report["results"]) == len(rows)  # one M in --smoke
    assert report["machine"]["threads_per_rank"] == 1 and report["machine"]["cpu_count"]

    reference = rows.pop(pp_bench.REFERENCE)
    assert "bubble" not in reference and "textbook_bubble" not in reference
    assert reference["vs_reference"] == 1.0
    m = reference["microbatches"]
    textbook = {"pp2 1F1B": 1 / (m + 1), "pp2 Interleaved1F1B": 1 / (2 * m + 1), "pp4 1F1B": 3 / (m + 3),
                "pp2 x dp_shard2 1F1B": 1 / (m + 1)}
    for name, r in [(pp_bench.REFERENCE, reference), *rows.items()]:
        assert math.isfinite(r["step_s"]) and r["step_s"] > 0, (name, r["step_s"])
        assert r["global_batch"] == reference["global_batch"], name
        assert r["first_loss"] == pytest.approx(reference["first_loss"], rel=1e-5), name
    for name, r in rows.items():
        # A pipeline always waits somewhere (stage 0 for the first backward): > 0, and < 1 only
        # when the stages' compute was timed.
        assert 0.01 < r["bubble"] < 1, (name, r["bubble"])
        assert r["textbook_bubble"] == pytest.approx(textbook[name]), name
        assert len(r["busy_s_per_rank"]) == r["ranks"] and min(r["busy_s_per_rank"]) > 0, name
        assert r["busy_s_per_rank"][0] < r["schedule_s"], name
        for rank, calls in enumerate(r["calls_per_rank"]):  # the timers sit where every chunk computes
            chunks = m * r["stages_per_rank"]
            assert calls["forward_one_chunk"] == calls["backward_one_chunk"] == chunks, (name, rank, calls)
            assert calls["schedule"] == 1, (name, rank, calls)
    assert rows["pp2 Interleaved1F1B"]["stages_per_rank"] == 2 and rows["pp4 1F1B"]["stages_per_rank"] == 1
