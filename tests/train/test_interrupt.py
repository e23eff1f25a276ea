"""SIGINT / SIGTERM: the step finishes, a checkpoint is written, one line, exit 130 / 143; the same
command resumes and logs exactly what an uninterrupted run logs (CPU)."""

import json
import os
import random
import signal

import pytest

from kimi_train.errors import Interrupted
from kimi_train.loop import checkpoint as ckpt
from kimi_train.loop.checkpoint import store
from kimi_train.loop.interrupt import StopOnSignal
from kimi_train.loop.trainer import Trainer

from conftest import read_metrics, run_cli
from test_trainer import small_cfg

TIMING = {"tokens_per_s", "elapsed_s", "mfu"}  # the only fields allowed to differ between runs


def per_step(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_a_signal_stops_after_the_step_and_a_second_one_at_once():
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopOnSignal(verbose=False) as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGINT)  # delivered before the next bytecode: no KeyboardInterrupt
        assert stop.requested()
        assert stop.interrupted(7).exit_code == 130
        assert str(stop.interrupted(7)) == "stopped at step 7; run the same command to resume"
        with pytest.raises(Interrupted, match="second SIGINT: stopped at once") as second:
            os.kill(os.getpid(), signal.SIGINT)
        assert second.value.exit_code == 130
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_fit_saves_at_the_signalled_step_raises_interrupted_and_restores_the_handlers(tmp_path, monkeypatch):
    monkeypatch.setenv("KIMI_TRAIN_DEBUG_KILL_AT", "0:2:TERM")  # SIGTERM while step 2 runs
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    trainer = Trainer(small_cfg(steps=4), tmp_path)
    with pytest.raises(Interrupted, match=r"^stopped at step 2; run the same command to resume$") as stopped:
        trainer.fit()
    assert stopped.value.exit_code == 143
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    stopped_summary = json.loads((tmp_path / "summary.json").read_text())  # the stopped session counts
    assert [(s["start_step"], s["end_step"], s["stopped"]) for s in stopped_summary["sessions"]] == [(0, 2, "signal")]
    monkeypatch.delenv("KIMI_TRAIN_DEBUG_KILL_AT")
    summary = Trainer(small_cfg(steps=4), tmp_path).fit()
    assert summary["steps"] == 4  # and after a normal return
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert [(s["start_step"], s["end_step"]) for s in summary["sessions"]] == [(0, 2), (2, 4)]
    assert summary["elapsed_s_total"] == pytest.approx(sum(s["elapsed_s"] for s in summary["sessions"]))
    assert summary["tokens"] == sum(s["tokens"] for s in summary["sessions"])


def test_a_second_sigint_during_the_save_stops_at_once_and_the_previous_checkpoint_loads(tmp_path, monkeypatch):
    cfg = small_cfg(steps=6)
    cfg.checkpoint.every = 2
    monkeypatch.setenv("KIMI_TRAIN_DEBUG_KILL_AT", "0:3:INT")  # the first SIGINT while step 3 runs
    save = store.dcp.save

    def save_then_sigint(*args, **kwargs):  # the second one once step 3's tensors are written
        out = save(*args, **kwargs)
        if "step_00000003" in str(kwargs.get("checkpoint_id")):
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(store.dcp, "save", save_then_sigint)
    with pytest.raises(Interrupted, match="second SIGINT: stopped at once, without saving") as stopped:
        Trainer(cfg, tmp_path).fit()
    assert stopped.value.exit_code == 130
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2]
    monkeypatch.undo()
    resumed = Trainer(small_cfg(steps=6), tmp_path)
    assert resumed.resumed_from is not None and resumed.step == 2


def test_sigterm_at_a_random_step_then_the_same_command_resumes_exactly(tmp_path, small_overrides):
    steps, stop_at = 12, random.randint(2, 11)  # seeded: tests/conftest.py
    common = [*small_overrides, f"train.steps={steps}", "checkpoint.every=4"]
    reference = run_cli([*common, f"run_dir={tmp_path / 'ref'}"])
    assert reference.returncode == 0, reference.stderr[-2000:]

    run = [*common, f"run_dir={tmp_path / 'run'}"]
    stopped = run_cli(run, env_extra={"KIMI_TRAIN_DEBUG_KILL_AT": f"0:{stop_at}:TERM"})
    assert stopped.returncode == 143, (stop_at, stopped.stderr[-2000:])
    assert stopped.stderr.splitlines()[-1] == f"kimi-train: stopped at step {stop_at}; run the same command to resume"
    assert ckpt.latest_checkpoint(tmp_path / "run") == ckpt.checkpoint_path(tmp_path / "run", stop_at)

    resumed = run_cli(run)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step_{stop_at:08d}"), (stop_at, summary["resumed_from"])
    got, want = per_step(read_metrics(tmp_path / "run")), per_step(read_metrics(tmp_path / "ref"))
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert got == want, stop_at


def test_sigint_exits_130_with_one_line_and_no_traceback(tmp_path, small_overrides):
    proc = run_cli([*small_overrides, "train.steps=6", f"run_dir={tmp_path}"],
                   env_extra={"KIMI_TRAIN_DEBUG_KILL_AT": "0:3:INT"})
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == "kimi-train: stopped at step 3; run the same command to resume"
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.checkpoint_path(tmp_path, 3)
