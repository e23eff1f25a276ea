"""torchrun --max-restarts=1 with one rank SIGKILLed: the job restarts, resumes from the last
checkpoint and logs exactly what the uninterrupted run logs (CPU), with no step duplicated or missing.

Rank 1 is killed as it starts step 13 (KIMI_TRAIN_DEBUG_KILL_AT=1:13, first attempt only), while
rank 0 waits inside that step's first collective; the last checkpoint is step 10 (every 5).
"""

from __future__ import annotations

import re
import shutil

import pytest

import _torchrun

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")]


# The restarted round's gloo rendezvous can fail to connect ("connectFullMesh failed ... Connection
# refused"): torchrun hands the workers its own rendezvous store, whose keys outlive the killed
# round. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (_torchrun.env, with restarts) gives each round a fresh
# store and made it rare here (1 failure in 11 runs, against 2 in 4 without); docs/distributed.md says
# so. Then torch picks the workers' port by bind-and-close, which another process can take first.
# Both failures are torch's, before any kimi-train code runs, so such a run is retried once, fresh.


def test_a_killed_rank_restarts_and_resumes_exactly(tmp_path, tmp_path_factory):
    reference = _torchrun.reference(tmp_path_factory)
    run_dir = tmp_path / "run"
    proc = _torchrun.run(run_dir, max_restarts=1, extra_env={"KIMI_TRAIN_DEBUG_KILL_AT": "1:13"})
    if proc.returncode != 0 and any(race in proc.stderr for race in _torchrun.RENDEZVOUS_RACES):
        run_dir = tmp_path / "retry" / "run"
        run_dir.parent.mkdir()
        proc = _torchrun.run(run_dir, max_restarts=1, extra_env={"KIMI_TRAIN_DEBUG_KILL_AT": "1:13"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    # It did die: torchrun saw a worker fail. Usually it names rank 1's SIGKILL (exitcode -9), but it
    # may name rank 0 instead, which it terminated (-15) after the killed rank reset rank 0's
    # connection (seen once in CI): the failure line is what both have.
    assert "Signal 9 (SIGKILL)" in output or re.search(r"failed \(exitcode: -(9|15)\)", output), output[-3000:]
    assert "resumed from step_00000010" in output, output[-3000:]
    assert _torchrun.per_step(run_dir) == reference
