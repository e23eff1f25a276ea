"""Checkpoints: torch.distributed.checkpoint (DCP), atomic, resumable, pickle-free to load.

Layout of one checkpoint (RUN_DIR/checkpoints/step_00000040/):

    __0_0.distcp ...       DCP shards: {"model": ..., "optim": ...} from get_*_state_dict,
    .metadata              so a run saved with one sharding loads into another (FSDP resharding)
    trainer_state.json     step, skipped steps, data-loader position, schedule, metrics summary
    rng_rank{r}.json       each rank's RNG states (torch CPU/CUDA, python, numpy)
    COMPLETE               written last, before the directory is renamed into place

Atomicity: everything is written into ``step_XXXXXXXX.tmp``; only after every rank has
finished does rank 0 write COMPLETE and rename the directory. A crash at any point leaves
either a ``.tmp`` directory or a directory without COMPLETE, both of which the loader
ignores, so the previous checkpoint stays the one that loads. The last ``keep`` complete
checkpoints are kept.

Loading never unpickles code: tensors come from DCP, small state from JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoints_root(run_dir) / f"step_{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first; .tmp and unmarked ones are skipped."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir() and (path / COMPLETE).is_file() and (path / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
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


# ---------------------------------------------------------------------------- save / load
def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _debug_kill_during_save(step: int) -> None:
    # Test hook: simulate a crash after the tensors are written but before COMPLETE.
    if os.environ.get("KIMI_TRAIN_DEBUG_KILL_IN_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically (every rank calls this); prune to the last ``keep``."""
    final = checkpoint_path(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, checkpoint_id=str(tmp))
    _write_json(tmp / f"rng_rank{_rank()}.json", rng_state())
    _barrier()
    if _rank() == 0:
        _write_json(tmp / TRAINER_STATE, {**trainer_state, "step": step})
        _debug_kill_during_save(step)
        _write_json(tmp / COMPLETE, {"step": step})
        if final.exists():  # re-saving a step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(run_dir, keep)
    _barrier()
    return final


def _prune(run_dir: str | Path, keep: int) -> None:
    complete = complete_checkpoints(run_dir)
    for _, path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    newest = complete[-1][0] if complete else -1
    for path in checkpoints_root(run_dir).iterdir():  # leftovers of interrupted saves
        m = re.match(r"^step_(\d+)(\.tmp)?$", path.name)
        if m and int(m.group(1)) <= newest and (m.group(2) or not (path / COMPLETE).exists()):
            shutil.rmtree(path, ignore_errors=True)


def _dcp_load(state: dict, path: Path) -> None:
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path))


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict:
    """Load model (and optimizer) tensors and this rank's RNG states; return the trainer state."""
    path = Path(path)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    _dcp_load(state, path)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    rng_file = path / f"rng_rank{_rank()}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    return json.loads((path / TRAINER_STATE).read_text())


def all_finite(*modules_or_optims: Any) -> bool:
    """True when every floating tensor of the models' parameters/buffers and optimizers' states is finite."""
    ok = True
    for obj in modules_or_optims:
        if isinstance(obj, torch.nn.Module):
            tensors = list(obj.parameters()) + list(obj.buffers())
        else:
            tensors = [v for s in obj.state.values() for v in s.values() if torch.is_tensor(v)]
        for t in tensors:
            t = t.to_local() if hasattr(t, "to_local") else t
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                ok = False
                break
    if dist.is_initialized():
        # NCCL only reduces CUDA tensors: put the flag where the default group can reduce it
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([1.0 if ok else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item() == 1.0)
    return ok


def load_model_from_run(run_dir: str | Path, step: Optional[int] = None, device: str | torch.device = "cpu"):
    """The model of a training run: its saved config and the latest (or given) complete checkpoint.

    >>> model = load_model_from_run("runs/tiny-muonclip")
    """
    from omegaconf import OmegaConf

    from kimi_train.model import KimiForCausalLM, model_config_from_dict

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise ValueError(f"run_dir={str(run_dir)!r} has no config.yaml; pass the directory of a kimi-train run")
    model_cfg = model_config_from_dict(OmegaConf.to_container(OmegaConf.load(cfg_file).model, resolve=True))
    if step is None:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise ValueError(f"run_dir={str(run_dir)!r} has no complete checkpoint under checkpoints/")
    else:
        path = checkpoint_path(run_dir, step)
        if not (path / COMPLETE).is_file():
            steps = [s for s, _ in complete_checkpoints(run_dir)]
            raise ValueError(f"step={step} has no complete checkpoint in {run_dir}; available steps: {steps}")
    with torch.device(device):
        model = KimiForCausalLM(model_cfg)
    state = {"model": get_model_state_dict(model)}
    _dcp_load(state, path)
    set_model_state_dict(model, state["model"])
    return model
