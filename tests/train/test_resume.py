"""Exact resume after a real SIGKILL, and a checkpoint interrupted mid-write being ignored."""

import signal

from kimi_train.loop.checkpoint import complete_checkpoints, latest_checkpoint

from conftest import read_metrics, run_cli


def test_sigkill_mid_save_then_resume_matches_uninterrupted_run_exactly(tmp_path, small_overrides):
    common = [*small_overrides, "train.steps=40", "checkpoint.every=5", "checkpoint.keep=2"]
    full = run_cli([*common, f"run_dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-2000:]

    # Killed with SIGKILL while writing the step-25 checkpoint (after its tensors, before COMPLETE).
    run_dir = tmp_path / "killed"
    killed = run_cli([*common, f"run_dir={run_dir}"], env_extra={"KIMI_TRAIN_DEBUG_KILL_IN_SAVE": "25"})
    assert killed.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / "step_00000025.tmp").is_dir()  # the interrupted write is there ...
    assert latest_checkpoint(run_dir).name == "step_00000020"  # ... and ignored
    assert [s for s, _ in complete_checkpoints(run_dir)] == [15, 20]  # keep=2

    resumed = run_cli([*common, f"run_dir={run_dir}", "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step_00000020" in resumed.stdout

    want, got = read_metrics(tmp_path / "full"), read_metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, 41))  # one record per step, none duplicated
    for a, b in zip(want, got):
        for key in ("loss", "grad_norm", "lr", "max_logit", "max_logit_per_layer", "expert_load_imbalance",
                    "val_loss"):
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))
    assert [s for s, _ in complete_checkpoints(run_dir)] == [35, 40]
    assert not (run_dir / "checkpoints" / "step_00000025.tmp").exists()  # replaced by the real step 25


def test_resume_never_starts_over(tmp_path, small_overrides):
    args = [*small_overrides, "train.steps=3", f"run_dir={tmp_path}"]
    assert run_cli(args).returncode == 0
    again = run_cli([*args, "resume=never", "train.steps=2"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2]


def test_a_checkpoint_from_before_pipeline_parallelism_still_resumes_exactly(tmp_path, monkeypatch):
    """Checkpoints written before the optimizer state was flattened per parameter name (its param
    groups a list: optim.param_groups.0.lr) load at pp=1 and continue exactly; the next one is flat."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from kimi_train.config import (CheckpointConfig, DataConfig, LoggingConfig, TrainConfig, TrainLoopConfig,
                                   validate)
    from kimi_train.loop.trainer import Trainer
    from kimi_train.model import load_model_config
    from kimi_train.parallel.fsdp_engine import FSDP2State

    def cfg(steps):
        return validate(TrainConfig(model=load_model_config("tiny", num_hidden_layers=2),
                                    train=TrainLoopConfig(steps=steps, seq_len=32, micro_batch_size=2, log_every=1,
                                                          val_batches=0, dtype="fp32"),
                                    data=DataConfig(max_bytes=60_000), checkpoint=CheckpointConfig(every=2),
                                    logging=LoggingConfig(wandb="disabled", progress_bar=False, plots=False)))

    Trainer(cfg(4), tmp_path / "full").fit()

    def listed(self, checkpoint=None):  # the writer before pipeline parallelism
        return {"model": get_model_state_dict(self.model), "optim": get_optimizer_state_dict(self.model, self.optimizer)}

    with monkeypatch.context() as m:
        m.setattr(FSDP2State, "state_dict", listed)
        Trainer(cfg(2), tmp_path / "old").fit()
    old = tmp_path / "old" / "checkpoints" / "step_00000002"
    assert "optim.param_groups.0.lr" in FileSystemReader(str(old)).read_metadata().state_dict_metadata
    trainer = Trainer(cfg(4), tmp_path / "old")
    assert trainer.step == 2
    trainer.fit()
    want, got = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "old")
    assert [r["loss"] for r in got] == [r["loss"] for r in want] and [r["grad_norm"] for r in got] == [
        r["grad_norm"] for r in want]
    new = FileSystemReader(str(tmp_path / "old" / "checkpoints" / "step_00000004")).read_metadata()
    assert not FSDP2State.has_listed_param_groups(tmp_path / "old" / "checkpoints" / "step_00000004")
    assert not any(k.endswith(".param_names") for k in new.state_dict_metadata)  # not repeated per parameter
