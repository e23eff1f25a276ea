"""Loading: verify against the manifest, fall back past damaged checkpoints, restore the engine.

``load_latest`` walks the complete checkpoints newest first and loads the first one whose files
match its manifest (sizes, and CRC-32s unless ``checksums=False``); a damaged one gets a warning
naming the file and what is wrong. The ranks split the hashing and agree on the verdict, so every
rank loads the same checkpoint.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch.distributed.checkpoint as dcp

from . import ranks
from .manifest import verify_checkpoint
from .store import COMPLETE, TRAINER_STATE, CheckpointError, checkpoint_path, complete_checkpoints, set_rng_state


def dcp_load(state: dict, path: Path) -> None:
    """Load DCP tensors into ``state`` in place (DCP reads its .metadata with pickle)."""
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path))


def saved_engine(path: Path) -> str:
    """The engine (``TrainEngine.name``) whose layout checkpoint ``path`` has."""
    try:
        return json.loads((path / TRAINER_STATE).read_text()).get("engine", "fsdp2")
    except (OSError, ValueError):
        return "fsdp2"


def _load_into(path: Path, engine: Any) -> dict:
    """The engine's state and this rank's RNG states from ``path``; returns the trainer state."""
    saved = saved_engine(path)
    if saved != engine.name:
        raise CheckpointError(f"checkpoint {path} was written by parallel.engine={saved}; this run uses "
                              f"parallel.engine={engine.name}, whose checkpoints are laid out differently: resume "
                              f"with parallel.engine={saved}, or export the weights (kimi-train-export) and start a "
                              "new run")
    state = engine.state_dict(checkpoint=path)
    dcp_load(state, path)
    engine.load_state_dict(state)
    rng_file = path / f"rng_rank{ranks.rank()}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    return json.loads((path / TRAINER_STATE).read_text())


def load_newest_usable(run_dir: Path, load: Callable[[Path], Any], checksums: bool) -> Optional[tuple[Path, Any]]:
    """Verify and ``load`` the complete checkpoints newest first; warn about each damaged one;
    (its path, what ``load`` returned), None without any. Every rank must call it."""
    candidates = ranks.from_rank0([str(p) for _, p in reversed(complete_checkpoints(run_dir))])
    if not candidates:
        return None
    damaged = []
    for i, path in enumerate(map(Path, candidates)):
        problems = verify_checkpoint(path, checksums)
        if not problems:
            return path, load(path)
        damaged.append(f"{path.name} ({'; '.join(problems)})")
        then = f"trying the previous one, {Path(candidates[i + 1]).name}" if i + 1 < len(candidates) else \
            "no older checkpoint left"
        warnings.warn(f"checkpoint {path} is damaged: {'; '.join(problems)}; {then}", stacklevel=3)
    raise CheckpointError(f"run_dir={str(run_dir)!r}: none of its {len(candidates)} complete checkpoints is usable: "
                          f"{', '.join(damaged)}; restore the files, or start over with resume=never")


def load_latest(run_dir: str | Path, engine: Any, checksums: bool = True) -> Optional[tuple[Path, dict]]:
    """Resume: load the newest complete checkpoint whose files match its manifest into ``engine``
    (its ``state_dict``/``load_state_dict``; ``name`` must be the saved one) and this rank's RNG
    states; return (its path, the trainer state), None when the run has none. A damaged
    checkpoint gets a warning and the one before it is tried; none usable: ``CheckpointError``.
    Every rank must call it."""
    return load_newest_usable(Path(run_dir), lambda p: _load_into(p, engine), checksums)


def latest_usable(run_dir: str | Path, checksums: bool = True) -> Optional[tuple[Path, dict]]:
    """``load_latest`` without loading tensors: (the newest checkpoint that verifies, its trainer
    state), None without any; the same warnings and ``CheckpointError``. Every rank must call it.
    To decide before the model exists (e.g. how many steps are trained); then
    ``load_checkpoint(path, ..., checksums=False)`` loads it without hashing it again."""
    return load_newest_usable(Path(run_dir), lambda p: json.loads((p / TRAINER_STATE).read_text()), checksums)


def verified(path: Path, checksums: bool = True) -> Path:
    """``path``, after checking it is complete and matches its manifest (``CheckpointError`` if not)."""
    problems = verify_checkpoint(path, checksums)
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}")
    return path


def load_checkpoint(path: str | Path, engine: Any, checksums: bool = True) -> dict:
    """Load checkpoint ``path`` into ``engine`` (and this rank's RNG states) after verifying it
    against its manifest; return the trainer state. Damaged: ``CheckpointError`` (no fallback:
    use ``load_latest``)."""
    return _load_into(verified(Path(path), checksums), engine)


def step_checkpoint(run_dir: str | Path, step: int) -> Path:
    """Checkpoint ``step`` of a run, which must be complete (``CheckpointError`` naming the steps there are)."""
    path = checkpoint_path(run_dir, step)
    if not (path / COMPLETE).is_file():
        steps = [s for s, _ in complete_checkpoints(run_dir)]
        raise CheckpointError(f"step={step} has no complete checkpoint in {run_dir}; available steps: {steps}")
    return path
