"""Test hook: the whole gradients of one step, written where a test can compare two engines.

``KIMI_TRAIN_DEBUG_DUMP_GRADS=<step>:<path>``: after the backward of (1-based) step <step>, before
clipping and the optimizer step, every parameter's whole reduced gradient (fp32, by parameter name)
goes to <path> (torch.save, rank 0). Muon and AdamW are scale-invariant, so equal losses cannot
show a gradient scaled wrongly (e.g. divided twice by the accumulation steps); these can.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def debug_dump_grads(trainer: Any) -> None:
    spec = os.environ.get("KIMI_TRAIN_DEBUG_DUMP_GRADS")
    if not spec:
        return
    step, path = spec.split(":", 1)
    if trainer.step + 1 != int(step):
        return
    grads = trainer.engine.full_gradients()  # FSDP2: from the DTensor shards; DeepSpeed: from its partitions
    if trainer.is_main:
        torch.save(grads, path)
