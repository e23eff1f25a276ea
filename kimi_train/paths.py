"""Where kimi-train finds its files: one place, overridable from the environment."""

from __future__ import annotations

import os
from pathlib import Path

import kimi_train


def config_dir() -> Path:
    """The configs/ directory (repo root), or $KIMI_TRAIN_CONFIG_DIR when set."""
    override = os.environ.get("KIMI_TRAIN_CONFIG_DIR")
    if override:
        return Path(override)
    return Path(kimi_train.__file__).resolve().parents[1] / "configs"
