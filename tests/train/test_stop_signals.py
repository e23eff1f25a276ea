"""Stop signals as launchers deliver them: a signal that arrives while a periodic checkpoint is
written stops the run on that checkpoint (no further step, no second save: a step plus a save more
than the launcher's shutdown window allows); a launched rank (RANK set, whatever the launcher)
ignores a repeated signal, since Ctrl-C reaches it twice (directly and through the launcher)."""

import os
import signal

import pytest

from kimi_train.errors import Interrupted
from kimi_train.loop import checkpoint as ckpt
from kimi_train.loop.interrupt import StopOnSignal
from kimi_train.loop.trainer import Trainer

from conftest import read_metrics
from test_trainer import small_cfg


def test_a_signal_during_a_periodic_save_stops_right_after_it(tmp_path):
    cfg = small_cfg(steps=6)
    cfg.checkpoint.every = 2
    trainer = Trainer(cfg, tmp_path)
    save = trainer.save
    saves = []

    def save_and_get_signalled() -> None:
        saves.append(trainer.step)
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the step-2 checkpoint is being written
        save()

    trainer.save = save_and_get_signalled
    with pytest.raises(Interrupted, match=r"^stopped at step 2; run the same command to resume$") as stopped:
        trainer.fit()
    assert stopped.value.exit_code == 143
    assert saves == [2]  # one save: the periodic one
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_a_launched_rank_ignores_a_repeated_signal(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)  # not torchrun: DeepSpeed's launcher, srun
    monkeypatch.setenv("RANK", "1")
    with StopOnSignal(verbose=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's forwarded signal: no Interrupted raised here
        assert stop.requested()
        assert stop.interrupted(3).exit_code == 130  # the first signal decides
