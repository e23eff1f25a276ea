"""Directories a command writes into, checked before any work: a one-line UserError naming the path.

`CheckRunDir` runs `writable_dir` on the run (or sweep) directory of `kimi-train` as a Hydra
callback (configs/config.yaml, hydra.callbacks), because Hydra creates that directory and
writes .hydra/ into it before the training function starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from kimi_train.errors import UserError


def writable_dir(path: str | Path, what: str) -> Path:
    """``path``, created if missing, as a directory this process may write into; else a UserError
    naming ``what`` (e.g. "run_dir") and the path."""
    path = Path(path)
    blocker = next((p for p in [path, *path.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"{what}={str(path)!r} cannot be created: {str(blocker)!r} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what}={str(path)!r} cannot be created: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what}={str(path)!r} is not writable (permission denied)")
    return path


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra-core >= 1.1 has it
    Callback = object


class CheckRunDir(Callback):
    """Hydra callback: the run / sweep directory must be writable, or one line and exit 2.

    Hydra turns an exception raised in a callback into a warning and goes on, so this one
    prints kimi-train's one line and exits itself; with KIMI_TRAIN_DEBUG=1 it lets Hydra fail
    with its traceback instead.
    """

    def _check(self, config: Any, key: str) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        if os.environ.get("KIMI_TRAIN_DEBUG", "") not in ("", "0"):
            return
        HydraConfig.instance().set_config(config)  # the dir interpolates ${hydra:runtime.choices...}
        try:
            writable_dir(str(OmegaConf.select(config, key)), "run_dir")
        except UserError as e:
            print(f"kimi-train: {e}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
