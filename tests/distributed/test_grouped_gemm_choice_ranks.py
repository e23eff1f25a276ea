"""The grouped GEMM's "auto" map on 2 gloo ranks whose own timings prefer different kernels.

Stubbed timings (no kernel runs; the Triton path is declared usable): rank 0 finds Triton
faster everywhere, rank 1 finds torch faster everywhere and Triton much slower below T = 8.
Each time becomes its max over the ranks, so both ranks must install the same map: torch
below bucket 8, Triton from 8 on. Rank 0 writes it; a second session loads it without timing,
rank 1 through rank 0 (its own path does not exist and is never written).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from _spawn import spawn

TIMES_MS = {0: lambda name, T: {"torch": 3.0, "triton": 1.0}[name],
            1: lambda name, T: {"torch": 1.0, "triton": 2.0 if T >= 8 else 4.0}[name]}


def _worker(rank: int, world: int, out: str) -> None:
    from kimi_train.kernels import grouped_gemm as gg

    out_dir = Path(out)
    path = out_dir / "run" / "grouped_gemm_choices.json" if rank == 0 else out_dir / f"absent{rank}" / "choices.json"
    gg._triton_usable = lambda x: True
    gg._time_backend_ms = lambda name, x, w, offs: TIMES_MS[rank](name, x.shape[0])
    tuned = gg.tune_grouped_gemm([(4, 16, 8)], 16, "cpu", torch.float32, path=path)
    installed = dict(gg._choices)

    def never_timed(name, x, w, offs):
        raise AssertionError("the second session timed a kernel")

    gg._choices.clear()
    gg._time_backend_ms = never_timed
    loaded = gg.tune_grouped_gemm([(4, 16, 8)], 16, "cpu", torch.float32, path=path)
    result = {"tuned": tuned, "installed": installed, "loaded": loaded, "used": dict(gg._choices)}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


def test_ranks_agree_on_one_map_and_reuse_it(tmp_path):
    spawn(_worker, 2, str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    expected = {f"16,8,4,float32,{T}": "torch" if T < 8 else "triton" for T in (1, 2, 4, 8, 16)}
    for r in (r0, r1):
        assert r["tuned"] == r["installed"] == r["loaded"] == r["used"] == expected
    assert json.loads((tmp_path / "run" / "grouped_gemm_choices.json").read_text())["choices"] == expected
    assert not (tmp_path / "absent1").exists()
