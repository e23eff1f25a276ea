"""A run directory is the record of one run: what rerunning `kimi-train` on it may do.

`check_rerun` decides, on every rank and before anything is built or written, from the run
directory's config.yaml and its latest complete checkpoint (every rank reads the same files,
so every rank decides alike; only rank 0 writes, after the trainer's first barrier):

    resume=never                         start over here (the trainer deletes the old checkpoints,
                                         metrics, summary and plots)
    no complete checkpoint               start (nothing has trained yet)
    changed config                       refused, one line (UserError, exit 2), no file touched,
                                         unless every changed key is in SAFE_KEYS or passes
                                         the schedule rule below
    every step trained                   "finished": one line, exit 0, no file written
    otherwise                            resume from the latest complete checkpoint

Schedule rule: a change of train.steps or of a schedule.* key is accepted iff every step
already trained keeps its lr multiplier (LRSchedule is a pure function of the step), so a
resume never re-warms or re-decays silently: extending WSD from its stable phase moves the
decay to the new end; extending it once the decay has begun, or cosine after the warmup, is
refused; constant is always fine.

config.yaml is the whole config that trains from the resumed step on; since every key that
changes what is trained is equal to the recorded one, it also describes the steps before.
summary.json keeps one entry per session (`sessions`) with the safe keys it changed.
"""

from __future__ import annotations

import dataclasses

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kimi_train.errors import UserError
from kimi_train.loop import checkpoint as ckpt
from kimi_train.loop.schedule import LRSchedule

CONFIG_FILE, SUMMARY_FILE = "config.yaml", "summary.json"

# Keys a resumed run may change, and why: none of them changes a number the model or the
# optimizer sees, nor the meaning of a number already logged, except parallel.*, which splits the
# same global batch over other ranks (results differ in rounding only, as when the world size
# changes under parallel.dp_shard=-1, which no config shows; DCP reshards the checkpoint and the
# data loader refuses another global batch): resuming on other hardware needs it. Every other key,
# those that change only rounding included (train.cpu_threads, train.compile, train.dtype,
# optim.ns_*), must be the recorded value. A key ending in "." covers its group.
SAFE_KEYS: dict[str, str] = {
    "parallel.": "how ranks split the same global batch (see above)",
    "logging.": "how metrics are reported (wandb, bar, plots, the post-step max-logit diagnostic: "
                "a no-grad forward, bit-identical on CPU)",
    "checkpoint.every": "when the state is saved; saving does not change it",
    "checkpoint.keep": "how many saved states are kept",
    "train.log_every": "which steps are logged",
    "train.val_every": "when the fixed validation set is evaluated (eval mode, no state change)",
    "train.peak_flops": "only the MFU figure",
    "train.max_skipped_steps": "when to give up on non-finite steps; a step that trains is the same",
    "train.activation_checkpointing": "what the backward recomputes, not what it computes (bit-identical on CPU)",
    "train.recompute_moe_down_proj": "what the backward recomputes, not what it computes (bit-identical on CPU)",
    "data.cache_dir": "where the tokens are cached, not which tokens",
    "resume": "how this session starts",
    "run_name": "the run's name (wandb, labels); the directory is the run",
    "run_dir": "the same directory may be written as another path",
}
# train.steps and schedule.* follow the schedule rule instead.
SCHEDULE_KEYS = ("train.steps", "schedule.")
_SHOWN = 6  # changed keys named in one error line


# ... except the engine: FSDP2 and DeepSpeed checkpoints are laid out differently (checkpoint.py).
UNSAFE_KEYS = ("parallel.engine",)


def is_safe(key: str) -> bool:
    if key in UNSAFE_KEYS:
        return False
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in SAFE_KEYS)


def _is_schedule_key(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in SCHEDULE_KEYS)


# ---------------------------------------------------------------------------- configs as flat dicts
def config_container(cfg: Any) -> dict:
    """A TrainConfig as the plain dict config.yaml holds."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; lists and None are values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recorded_config(run_dir: Path) -> Optional[dict[str, Any]]:
    """The flat config of run_dir/config.yaml; a key it lacks (added to the schema later) reads
    as the schema's default, which keeps the behaviour of the code that wrote it."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from kimi_train.config import TrainConfig

    try:
        stored = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as e:  # the record is unreadable
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "restore it, or start over with resume=never") from None
    return {**flatten(config_container(TrainConfig())), **flatten(stored or {})}


def write_config(run_dir: Path, cfg: Any) -> None:
    """config.yaml <- cfg, atomically (a reader on another rank never sees half a file)."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / CONFIG_FILE
    tmp = path.with_name(path.name + ".tmp")
    OmegaConf.save(OmegaConf.create(config_container(cfg)), tmp)
    os.replace(tmp, path)


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def _changes(items: dict[str, tuple[Any, Any]]) -> str:
    parts = [f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in items.items()]
    more = f" (and {len(parts) - _SHOWN} more)" if len(parts) > _SHOWN else ""
    return ", ".join(parts[:_SHOWN]) + more


# ---------------------------------------------------------------------------- the schedule rule
def schedule_of(flat: dict[str, Any]) -> LRSchedule:
    return LRSchedule(flat["train.steps"], flat["schedule.warmup_steps"], flat["schedule.type"],
                      flat["schedule.decay_fraction"], flat["schedule.decay_shape"], flat["schedule.min_lr_ratio"])


def first_changed_step(old: LRSchedule, new: LRSchedule, trained: int) -> Optional[int]:
    """The first 0-based step < trained whose lr multiplier differs between the schedules, or None."""
    return next((s for s in range(trained) if old(s) != new(s)), None)


def _schedule_refusal(old: dict[str, Any], new: dict[str, Any], trained: int, run_dir: Path) -> Optional[str]:
    """Why the new train.steps / schedule.* may not continue a run that trained ``trained`` steps."""
    old_steps, new_steps = old["train.steps"], new["train.steps"]
    if new_steps != old_steps and new_steps <= trained:
        return (f"run_dir {run_dir} has trained {trained} of train.steps={old_steps}; train.steps={new_steps} "
                f"would not train any step; keep train.steps={old_steps}, or start a new run "
                "(another run_name/run_dir)")
    old_s, new_s = schedule_of(old), schedule_of(new)
    s = first_changed_step(old_s, new_s, trained)
    if s is None:
        return None
    lr = new["optim.lr"]
    return (f"run_dir {run_dir}: {_changes(_diff(old, new, _is_schedule_key))} changes the lr of steps already "
            f"trained (step {s + 1} of {trained} ran at {old_s(s) * lr:.3g}, the new schedule gives "
            f"{new_s(s) * lr:.3g}); keep the old values, or start a new run (another run_name/run_dir) "
            f"that loads nothing")


def _diff(old: dict[str, Any], new: dict[str, Any], keep) -> dict[str, tuple[Any, Any]]:
    keys = list(new) + [k for k in old if k not in new]
    return {k: (old.get(k), new.get(k)) for k in keys if keep(k) and old.get(k) != new.get(k)}


# ---------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class Rerun:
    """What this session does with its run directory."""

    action: str  # "start" | "resume" | "finished"
    trained_steps: int = 0  # steps in the latest complete checkpoint (resume / finished)
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # accepted changes: old, new
    checkpoint: Optional[Path] = None  # the verified checkpoint of trained_steps (resume / finished)

    def finished_message(self, run_dir: Path) -> str:
        return (f"run_dir {run_dir} already finished {self.trained_steps}/{self.trained_steps} steps; nothing to "
                "do (change run_name or run_dir for a new run)")

    def changes_message(self) -> str:
        return f"resuming at step {self.trained_steps} with changed keys: {_changes(self.changed)}"


def usable_checkpoint(run_dir: Path) -> Optional[tuple[Path, int]]:
    """The newest checkpoint of run_dir that verifies (a damaged newer one: a warning) and its step;
    None without one. Collective under torch.distributed (every rank gets the same answer)."""
    found = ckpt.latest_usable(run_dir)
    return None if found is None else (found[0], int(found[1]["step"]))


def check_rerun(run_dir: str | Path, cfg: Any) -> Rerun:
    """May ``cfg`` run in ``run_dir``, and how (see the module docstring)? Reads files, writes none;
    every rank calls it and reaches the same answer. Raises UserError (one line) on a refusal."""
    run_dir = Path(run_dir)
    if cfg.resume == "never":
        return Rerun("start")
    found = usable_checkpoint(run_dir)
    trained = None if found is None else found[1]
    old = recorded_config(run_dir) if trained is not None else None
    rerun = decide(run_dir, old, flatten(config_container(cfg)), trained)
    return dataclasses.replace(rerun, checkpoint=found[0]) if found is not None else rerun


def _schema_defaults() -> dict[str, Any]:
    from kimi_train.config import TrainConfig

    return flatten(config_container(TrainConfig()))


def decide(run_dir: Path, old: Optional[dict[str, Any]], new: dict[str, Any], trained: Optional[int]) -> Rerun:
    """check_rerun without the files: ``old`` the recorded flat config (None: no config.yaml),
    ``new`` this command's, ``trained`` the latest complete checkpoint's step (None: none)."""
    if trained is None:
        return Rerun("start")
    if old is None:
        raise UserError(f"run_dir {run_dir} has checkpoints but no {CONFIG_FILE} to check this config against; "
                        "restore it, start a new run (another run_name/run_dir), or start over here with resume=never")
    # A key the record lacks was added to the schema after the run was recorded: that run trained with
    # what the key's default does (a new key defaults to the old behaviour).
    old = {**{k: v for k, v in _schema_defaults().items() if k not in old}, **old}
    unsafe = _diff(old, new, lambda k: not is_safe(k) and not _is_schedule_key(k))
    if unsafe:
        raise UserError(f"run_dir {run_dir} holds a run trained with another config: {_changes(unsafe)}; rerun with "
                        "the recorded values (its config.yaml), or start a new run (another run_name/run_dir, "
                        "or resume=never to start over here)")
    refusal = _schedule_refusal(old, new, trained, run_dir)
    if refusal:
        raise UserError(refusal)
    if trained >= new["train.steps"]:
        return Rerun("finished", trained)
    return Rerun("resume", trained, _diff(old, new, lambda k: True))


# ---------------------------------------------------------------------------- Hydra's record
# Hydra writes its record of the command (config, overrides) before the job runs; configs/config.yaml
# points it at HYDRA_PENDING, and only a run that starts or resumes makes it the run's .hydra/.
HYDRA_PENDING, HYDRA_RECORD = ".hydra.pending", ".hydra"


def adopt_hydra_record(run_dir: Path) -> None:
    pending = Path(run_dir) / HYDRA_PENDING
    if pending.is_dir():
        shutil.rmtree(Path(run_dir) / HYDRA_RECORD, ignore_errors=True)
        os.replace(pending, Path(run_dir) / HYDRA_RECORD)


def drop_hydra_record(run_dir: Path, is_main: bool = True) -> None:
    if is_main:
        shutil.rmtree(Path(run_dir) / HYDRA_PENDING, ignore_errors=True)


# ---------------------------------------------------------------------------- summary.json
def read_summary(run_dir: Path) -> Optional[dict]:
    try:
        return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    path = Path(run_dir) / SUMMARY_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)


def summarize(previous: Optional[dict], session: dict[str, Any], totals: dict[str, Any],
              last: Optional[dict]) -> dict[str, Any]:
    """summary.json after a session: ``totals`` (steps, tokens, ... of the model now), the
    ``previous`` summary's sessions (a resumed run; None: a new one) plus this ``session``,
    elapsed_s_total over them, and the losses of this session's last record; a session that
    logged no record keeps the previous final losses."""
    previous = previous or {}
    sessions = list(previous.get("sessions", [])) + [session]
    summary = {**totals, "elapsed_s_total": sum(s["elapsed_s"] for s in sessions), "sessions": sessions}
    if last is None:
        summary.update(final_loss=previous.get("final_loss"), final_val_loss=previous.get("final_val_loss"))
    else:
        summary.update(final_loss=last.get("loss"), final_val_loss=last.get("val_loss"))
    return summary
