"""Where checkpoints live, and how one is written atomically and old ones pruned.

Everything is written into ``step_XXXXXXXX.tmp``; each rank hashes the files it wrote, rank 0
gathers the hashes, writes the trainer state, the manifest, then COMPLETE, and renames the
directory. A crash or a failed write (disk full, permission denied: one-line ``CheckpointError``)
leaves at most a ``.tmp`` directory, which the loader ignores: the previous checkpoint stays
the one that loads. Older checkpoints are pruned only after the new one is in place.

Fault injection (tests/reliability/faults.py, the checkpoint tests) has one hook point,
``_fault``, which every write of a save passes through ("mkdir", "write", "wrote"):

    KIMI_TRAIN_DEBUG_KILL_IN_SAVE=<step>            SIGKILL before COMPLETE of that step is written
    KIMI_TRAIN_DEBUG_FAIL_IN_SAVE=<ERRNO>:<pattern>  fail every path (relative to checkpoints/, fnmatch)
                                                    matching: a directory is not created, a file is
                                                    cut to half its size (a disk that filled up mid-write)
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import random
import re
import shutil
import signal
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem

from kimi_train.errors import UserError

from . import ranks
from .manifest import MANIFEST, file_entry, files_written_by, manifest

_STEP_DIR = re.compile(r"^step_(\d+)$")
_ANY_STEP_DIR = re.compile(r"^step_(\d+)(\.tmp|\.old)?$")
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be written or none can be loaded; one line naming the path.

    A ValueError too, so ``kimi-train-export`` reports it as the one line it prints for bad input."""


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoints_root(run_dir) / f"step_{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint marked COMPLETE, oldest first; .tmp and unmarked ones are
    skipped. Complete is not verified: ``load_latest`` checks the files against the manifest."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir() and (path / COMPLETE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest checkpoint marked COMPLETE (not verified; to resume, use ``load_latest``)."""
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


# ---------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Every RNG the training loop may draw from, as JSON-serialisable values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------------- the fault hook (tests)
def _fault(path: Path, event: str) -> None:
    """Every write of a save passes here: "mkdir" before the directory is made, "write" before a
    file is written, "wrote" after; the faults the environment asks for happen here."""
    kill = os.environ.get("KIMI_TRAIN_DEBUG_KILL_IN_SAVE")
    if kill and event == "write" and path.name == COMPLETE and path.parent.name == f"step_{int(kill):08d}.tmp":
        os.kill(os.getpid(), signal.SIGKILL)
    spec = os.environ.get("KIMI_TRAIN_DEBUG_FAIL_IN_SAVE")
    if not spec or event == "write":  # a directory fails to be made, a file once half written
        return
    name, pattern = spec.split(":", 1)
    if fnmatch.fnmatch(f"{path.parent.name}/{path.name}", pattern) or fnmatch.fnmatch(path.name, pattern):
        code = getattr(errno, name)
        if event == "wrote":
            os.truncate(path, path.stat().st_size // 2)
        raise OSError(code, os.strerror(code), str(path))


class _HookedFileSystem(FileSystem):
    """DCP's file system with the fault hook applied to every file it writes."""

    @contextmanager
    def create_stream(self, path, mode):
        _fault(Path(path), "write")
        with super().create_stream(path, mode) as stream:
            yield stream
        _fault(Path(path), "wrote")


def _write_json(path: Path, obj: Any) -> None:
    _fault(path, "write")
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    _fault(path, "wrote")


# ---------------------------------------------------------------------------- save
def _attempt(fn: Callable, *args) -> tuple[Any, Optional[OSError]]:
    """(fn(*args), None), or (None, the OSError) when a write fails."""
    try:
        return fn(*args), None
    except OSError as e:
        return None, e


def _fresh_dir(tmp: Path) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    _fault(tmp, "mkdir")
    tmp.mkdir(parents=True)


def _write_rank_files(tmp: Path) -> dict[str, dict[str, Any]]:
    """This rank's RNG file; the manifest entries of every file this rank wrote."""
    _write_json(tmp / f"rng_rank{ranks.rank()}.json", rng_state())
    return {p.name: file_entry(p) for p in files_written_by(tmp, ranks.rank())}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(run_dir: Path, step: int, tmp: Path, final: Path, files: dict, trainer_state: dict, keep: int) -> None:
    """Rank 0: trainer state, manifest, COMPLETE, rename into place; then prune."""
    _write_json(tmp / TRAINER_STATE, {**trainer_state, "step": step})
    files = {**files, TRAINER_STATE: file_entry(tmp / TRAINER_STATE)}
    _write_json(tmp / MANIFEST, manifest(files))
    _write_json(tmp / COMPLETE, {"step": step, "manifest": MANIFEST})
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():  # re-saving a step (e.g. stopped right after resuming from it): rename, not delete,
        os.replace(final, old)  # so a crash here leaves a complete copy (the prune removes it)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    prune(run_dir, keep, step)


def _fail(errors: list[Optional[OSError]], run_dir: Path, step: int, tmp: Path) -> None:
    """On every rank: if any rank's write failed, remove the partial .tmp (rank 0) and raise one line."""
    error = next((e for e in errors if e is not None), None)
    if error is None:
        return
    if ranks.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = latest_checkpoint(run_dir)
    kept = f"the previous checkpoint {previous} is kept" if previous else "there is no previous checkpoint"
    raise CheckpointError(f"cannot save checkpoint step_{step:08d}: {error.strerror or error} "
                          f"({error.filename or tmp}); {kept}") from error


def _os_error(e: CheckpointException) -> Optional[OSError]:
    """The first OSError of a failed DCP save (raised on every rank, with every rank's failures)."""
    for exc, _trace in e.failures.values():
        if isinstance(exc, OSError):
            return exc
    return None


def save_checkpoint(run_dir: str | Path, step: int, engine: Any, trainer_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` atomically with its manifest (every rank calls this): the tensors of
    ``engine.state_dict()`` (DCP), this rank's RNG states and ``trainer_state``; prune to the last
    ``keep``. A failed write raises ``CheckpointError`` on every rank, the previous checkpoint kept."""
    run_dir = Path(run_dir)
    final = checkpoint_path(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    error = _attempt(_fresh_dir, tmp)[1] if ranks.rank() == 0 else None
    _fail([ranks.from_rank0(error)], run_dir, step, tmp)

    writer = FileSystemWriter(tmp)
    writer.fs = _HookedFileSystem()
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(engine.state_dict(), checkpoint_id=str(tmp), storage_writer=writer)
    except CheckpointException as e:
        if _os_error(e) is None:
            raise
        _fail([_os_error(e)], run_dir, step, tmp)

    written = ranks.all_gather(_attempt(_write_rank_files, tmp))
    _fail([e for _, e in written], run_dir, step, tmp)
    error = None
    if ranks.rank() == 0:
        files = {name: entry for part, _ in written for name, entry in part.items()}
        error = _attempt(_commit, run_dir, step, tmp, final, files, trainer_state, keep)[1]
    _fail([ranks.from_rank0(error)], run_dir, step, tmp)
    return final


def prune(run_dir: str | Path, keep: int, saved: int) -> None:
    """After step ``saved`` is in place: keep it and the ``keep - 1`` complete checkpoints before it;
    remove the rest, including leftovers of interrupted saves and any checkpoint after ``saved``
    (a timeline the run left when it resumed from an earlier checkpoint, e.g. past a damaged one)."""
    kept = set([path for step, path in complete_checkpoints(run_dir) if step <= saved][-keep:])
    for path in checkpoints_root(run_dir).iterdir():
        if _ANY_STEP_DIR.match(path.name) and path not in kept:
            shutil.rmtree(path, ignore_errors=True)
