"""A run directory is a record: rerunning kimi-train on it resumes, says it is finished, or refuses
a changed config, before it touches a file (kimi_train/loop/run_record.py)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from kimi_train.config import TrainConfig
from kimi_train.errors import UserError
from kimi_train.loop import checkpoint as ckpt
from kimi_train.loop import run_record
from kimi_train.loop.run_record import SAFE_KEYS, config_container, decide, flatten
from kimi_train.loop.schedule import LRSchedule
from kimi_train.loop.trainer import Trainer

from conftest import read_metrics, run_cli
from test_trainer import small_cfg

RUN = Path("runs/x")


def _flat(**changes) -> dict:
    """The default config, flat, with {"optim.lr": 3e-3, ...} changed (keys written with "__" for ".")."""
    flat = flatten(config_container(TrainConfig()))
    for key, value in changes.items():
        key = key.replace("__", ".")
        assert key in flat, key
        flat[key] = value
    return flat


def _other(value):
    """A value of the same type that differs."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return [*value, 0]
    return f"{value}x"


def _files(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- the rules, without files
def test_every_key_outside_safe_keys_and_the_schedule_is_refused_and_every_safe_one_accepted():
    old = _flat(train__steps=100)
    for key, value in old.items():
        new = {**old, key: _other(value)}
        if run_record.is_safe(key):
            got = decide(RUN, old, new, trained=50)
            assert got.action == "resume" and got.changed == {key: (value, new[key])}, key
        elif key != "train.steps" and not key.startswith("schedule."):
            with pytest.raises(UserError, match=f"another config: {key}: "):
                decide(RUN, old, new, trained=50)
    assert run_record.is_safe("logging.wandb") and not run_record.is_safe("train.cpu_threads")
    assert all(run_record.is_safe(k) or k.endswith(".") for k in SAFE_KEYS)


def test_a_refusal_names_every_changed_key_with_old_and_new_on_one_line():
    old = _flat(optim__lr=2e-3)
    new = _flat(optim__lr=3e-3, train__seed=1, model__hidden_size=256)
    with pytest.raises(UserError) as refused:
        decide(RUN, old, new, trained=300)
    message = str(refused.value)
    assert "\n" not in message
    for part in ("optim.lr: 0.002 -> 0.003", "train.seed: 0 -> 1", "model.hidden_size: 128 -> 256"):
        assert part in message, message


def test_a_key_added_after_the_run_was_recorded_counts_as_its_default():
    old = {k: v for k, v in _flat().items() if k not in ("model.loss_chunk_tokens", "train.activation_checkpointing")}
    assert decide(RUN, old, _flat(), trained=120) == run_record.Rerun("resume", 120)
    got = decide(RUN, old, _flat(train__activation_checkpointing="full"), trained=120)  # a safe key: accepted
    assert got.changed == {"train.activation_checkpointing": ("none", "full")}
    with pytest.raises(UserError, match="another config: model.loss_chunk_tokens: 0 -> 1024"):
        decide(RUN, old, _flat(model__loss_chunk_tokens=1024), trained=120)


def test_no_checkpoint_starts_and_a_checkpoint_without_config_yaml_is_refused():
    assert decide(RUN, None, _flat(), trained=None).action == "start"
    assert decide(RUN, _flat(), _flat(optim__lr=1.0), trained=None).action == "start"  # nothing trained yet
    with pytest.raises(UserError, match="has checkpoints but no config.yaml"):
        decide(RUN, None, _flat(), trained=10)


def test_same_config_resumes_an_unfinished_run_and_finishes_a_finished_one():
    assert decide(RUN, _flat(), _flat(), trained=120) == run_record.Rerun("resume", 120)
    assert decide(RUN, _flat(), _flat(), trained=300) == run_record.Rerun("finished", 300)
    # safe keys do not turn a finished run into a session
    assert decide(RUN, _flat(), _flat(logging__plots=False), trained=300).action == "finished"


# (schedule, warmup, old steps, steps trained, new steps, other schedule changes) -> accepted
SCHEDULE_CASES = {
    "wsd: extended in the stable phase": ("wsd", 20, 100, 50, 200, {}, True),
    "wsd: extended on the last stable step": ("wsd", 20, 100, 80, 200, {}, True),
    "wsd: extended after the decay began": ("wsd", 20, 100, 81, 200, {}, False),
    "wsd: extended after it finished": ("wsd", 20, 100, 100, 200, {}, False),
    "wsd: shortened in the stable phase": ("wsd", 20, 100, 50, 70, {}, True),
    "wsd: min_lr_ratio in the stable phase": ("wsd", 20, 100, 50, 100, {"schedule.min_lr_ratio": 0.0}, True),
    "wsd: min_lr_ratio in the decay": ("wsd", 20, 100, 90, 100, {"schedule.min_lr_ratio": 0.0}, False),
    "wsd: warmup shortened after it": ("wsd", 20, 100, 50, 100, {"schedule.warmup_steps": 10}, False),
    "cosine: extended in the warmup": ("cosine", 20, 100, 20, 200, {}, True),
    "cosine: extended at its first decayed step": ("cosine", 20, 100, 21, 200, {}, True),  # step 20: 1.0
    "cosine: extended after it": ("cosine", 20, 100, 22, 200, {}, False),
    "constant: extended after it finished": ("constant", 20, 100, 100, 200, {}, True),
    "constant: shortened below what trained": ("constant", 20, 100, 50, 50, {}, False),
}


@pytest.mark.parametrize("case", SCHEDULE_CASES)
def test_schedule_changes_are_accepted_iff_every_trained_step_keeps_its_lr(case):
    kind, warmup, steps, trained, new_steps, more, accepted = SCHEDULE_CASES[case]
    old = _flat(schedule__type=kind, schedule__warmup_steps=warmup, train__steps=steps)
    new = {**old, "train.steps": new_steps, **more}
    if accepted:
        got = decide(RUN, old, new, trained)
        assert got.action == "resume" and set(got.changed) == {k for k in new if new[k] != old[k]}
        before, after = run_record.schedule_of(old), run_record.schedule_of(new)
        assert [before(s) for s in range(trained)] == [after(s) for s in range(trained)]
    else:
        with pytest.raises(UserError) as refused:
            decide(RUN, old, new, trained)
        message = str(refused.value)
        assert "\n" not in message and all(k in message for k in new if new[k] != old[k]), message


def test_a_refused_extension_says_which_step_and_what_to_do():
    old = _flat(train__steps=80, optim__lr=2e-3)  # wsd: warmup 20, decay over steps 65..80 to 2e-4
    with pytest.raises(UserError) as refused:
        decide(RUN, old, {**old, "train.steps": 100}, trained=80)
    assert str(refused.value) == (
        "run_dir runs/x: train.steps: 80 -> 100 changes the lr of steps already trained (step 65 of 80 ran at "
        "0.00198, the new schedule gives 0.002); keep the old values, or start a new run (another "
        "run_name/run_dir) that loads nothing")


def test_extending_wsd_in_the_stable_phase_continues_it_and_decays_at_the_new_end():
    old, new = LRSchedule(100, 20), LRSchedule(200, 20)
    assert run_record.first_changed_step(old, new, 80) is None
    assert [new(s) for s in range(80, 160)] == [1.0] * 80 and new(199) == pytest.approx(0.1)


def test_a_session_that_logged_nothing_keeps_the_final_losses_and_adds_its_totals():
    previous = {"final_loss": 1.5, "final_val_loss": 1.6,
                "sessions": [{"start_step": 0, "end_step": 10, "elapsed_s": 2.0, "tokens": 100}]}
    session = {"start_step": 10, "end_step": 10, "elapsed_s": 0.5, "tokens": 0}
    summary = run_record.summarize(previous, session, {"steps": 10}, last=None)
    assert (summary["final_loss"], summary["final_val_loss"]) == (1.5, 1.6)
    assert summary["elapsed_s_total"] == 2.5 and summary["sessions"] == [*previous["sessions"], session]
    assert run_record.summarize(previous, session, {}, last={"loss": 1.2})["final_val_loss"] is None


# ---------------------------------------------------------------------------- with the trainer
def _train_part(cfg, run_dir, steps: int) -> list[float]:
    """A session stopped after ``steps`` steps with a checkpoint there (as SIGTERM leaves one); its lrs."""
    trainer = Trainer(cfg, run_dir)
    lrs = []
    while trainer.step < steps:
        lrs.append(trainer.train_step()["lr"])
        trainer.step += 1
        trainer.tokens_seen += trainer.tokens_per_step
    trainer.save()
    trainer.metrics.close()
    return lrs


def _wsd(steps: int, **train):
    cfg = small_cfg(steps=steps, **train)
    cfg.schedule.warmup_steps, cfg.schedule.decay_fraction = 2, 0.25
    return cfg


def test_an_unfinished_run_resumes_exactly(tmp_path):
    Trainer(_wsd(8), tmp_path / "full").fit()
    _train_part(_wsd(8), tmp_path / "run", 3)
    resumed = Trainer(_wsd(8), tmp_path / "run")
    assert resumed.rerun.action == "resume" and resumed.step == 3 and not resumed.rerun.changed
    resumed.fit()
    want = {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(tmp_path / "full")}
    got = {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(tmp_path / "run")}
    assert got == {s: want[s] for s in range(4, 9)}


def test_wsd_extended_in_the_stable_phase_trains_every_step_at_the_longer_runs_lr(tmp_path):
    """8 steps planned (decay from step 7), stopped at 4, extended to 12: every step's lr and loss are
    those of an uninterrupted 12-step run, and the decay happens at its end."""
    Trainer(_wsd(12), tmp_path / "full").fit()
    want = {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(tmp_path / "full")}
    first_lrs = _train_part(_wsd(8), tmp_path / "run", 4)
    resumed = Trainer(_wsd(12), tmp_path / "run")
    assert resumed.rerun.changed == {"train.steps": (8, 12)}
    resumed.fit()
    got = {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(tmp_path / "run")}
    assert first_lrs == [want[s][1] for s in range(1, 5)]
    assert got == {s: want[s] for s in range(5, 13)}
    lr, lrs = small_cfg().optim.lr, [want[s][1] for s in range(1, 13)]
    assert lrs[2:9] == [lr] * 7 and lrs[8] > lrs[9] > lrs[10] > lrs[11] == pytest.approx(0.1 * lr)  # decay: 10-12


def test_wsd_extended_after_its_decay_is_refused_and_nothing_is_touched(tmp_path):
    Trainer(_wsd(8), tmp_path).fit()
    before = _files(tmp_path)
    with pytest.raises(UserError, match=r"train.steps: 8 -> 12 changes the lr of steps already trained \(step 7 "):
        Trainer(_wsd(12), tmp_path)
    assert _files(tmp_path) == before


def test_summary_keeps_every_session_and_a_finished_rerun_writes_nothing(tmp_path):
    def constant(steps, **train):
        cfg = small_cfg(steps=steps, val_batches=1, **train)
        cfg.schedule.type = "constant"
        return cfg

    Trainer(constant(3), tmp_path).fit()
    second = Trainer(constant(5, log_every=2), tmp_path)  # longer, and a safe key changed
    assert second.rerun == run_record.Rerun("resume", 3, {"train.steps": (3, 5), "train.log_every": (1, 2)},
                                            checkpoint=ckpt.checkpoint_path(tmp_path, 3))
    summary = second.fit()
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    tokens_per_step = second.tokens_per_step
    assert [(s["start_step"], s["end_step"], s["tokens"]) for s in summary["sessions"]] == [
        (0, 3, 3 * tokens_per_step), (3, 5, 2 * tokens_per_step)]
    assert summary["sessions"][1]["changed"] == {"train.steps": [3, 5], "train.log_every": [1, 2]}
    assert "changed" not in summary["sessions"][0]
    assert summary["tokens"] == 5 * tokens_per_step and summary["steps"] == 5
    assert summary["elapsed_s_total"] == sum(s["elapsed_s"] for s in summary["sessions"]) > 0
    last = read_metrics(tmp_path)[-1]
    assert (summary["final_loss"], summary["final_val_loss"]) == (last["loss"], last["val_loss"]) != (None, None)
    recorded = run_record.recorded_config(tmp_path)
    assert recorded["train.steps"] == 5 and recorded["train.log_every"] == 2  # what trains from step 3 on

    before = _files(tmp_path)
    again = Trainer(constant(5, log_every=2, val_every=1), tmp_path)  # a safe change: still nothing to do
    assert again.rerun.action == "finished"
    assert again.fit() == summary
    assert _files(tmp_path) == before


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_thread_count_is_part_of_the_config_recorded_and_used_on_resume(tmp_path, restore_threads):
    torch.set_num_threads(1)
    Trainer(small_cfg(steps=4, cpu_threads=2), tmp_path / "full").fit()
    torch.set_num_threads(1)
    _train_part(small_cfg(steps=4, cpu_threads=2), tmp_path / "run", 2)
    torch.set_num_threads(1)  # a new process
    resumed = Trainer(small_cfg(steps=4, cpu_threads=2), tmp_path / "run")
    assert torch.get_num_threads() == 2
    summary = resumed.fit()
    assert [s["cpu_threads"] for s in summary["sessions"]] == [2]  # the stopped session wrote no summary
    assert run_record.recorded_config(tmp_path / "run")["train.cpu_threads"] == 2
    want = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "full")]
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "run")] == want[2:]
    with pytest.raises(UserError, match="train.cpu_threads: 2 -> 1"):
        Trainer(small_cfg(steps=6, cpu_threads=1), tmp_path / "run")


# ---------------------------------------------------------------------------- the command line
def test_rerunning_a_finished_run_changes_no_file(tmp_path, small_overrides):
    """Same config: one line, exit 0. Changed lr (the acceptance check): one line, exit 2. A longer
    constant schedule with a safe key: resumes, and only then is Hydra's record of it kept."""
    args = [*small_overrides, "schedule.type=constant", f"run_dir={tmp_path}"]
    first = run_cli([*args, "train.steps=3"])
    assert first.returncode == 0, first.stderr[-2000:]
    before = _files(tmp_path)
    assert {"config.yaml", "summary.json", "metrics.jsonl", ".hydra/overrides.yaml"} <= set(before)

    same = run_cli([*args, "train.steps=3"])
    assert same.returncode == 0, same.stderr[-2000:]
    assert same.stdout == (f"run_dir {tmp_path} already finished 3/3 steps; nothing to do "
                           "(change run_name or run_dir for a new run)\n")
    assert _files(tmp_path) == before

    changed = run_cli([*args, "train.steps=3", "optim.lr=0.003"])
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert changed.stderr.splitlines() == [  # one line: Hydra adds none of its own
        f"kimi-train: run_dir {tmp_path} holds a run trained with another config: optim.lr: 0.002 -> 0.003; "
        "rerun with the recorded values (its config.yaml), or start a new run (another run_name/run_dir, or "
        "resume=never to start over here)"]
    assert "Traceback" not in changed.stderr and changed.stdout == ""
    assert _files(tmp_path) == before

    longer = run_cli([*args, "train.steps=5", "checkpoint.keep=3"])
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "resuming at step 3 with changed keys: train.steps: 3 -> 5, checkpoint.keep: 2 -> 3" in longer.stderr
    assert "train.steps=5" in (tmp_path / ".hydra" / "overrides.yaml").read_text()
    assert not (tmp_path / ".hydra.pending").exists()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
