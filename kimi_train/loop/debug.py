"""Test hooks of the trainer, read from the environment.

The whole gradients of one step, written where a test can compare two engines:

``KIMI_TRAIN_DEBUG_DUMP_GRADS=<step>:<path>``: after the backward of (1-based) step <step>, before
clipping and the optimizer step, every parameter's whole reduced gradient (fp32, by parameter name)
goes to <path> (torch.save, rank 0). Muon and AdamW are scale-invariant, so equal losses cannot
show a gradient scaled wrongly (e.g. divided twice by the accumulation steps); these can.

``KIMI_TRAIN_DEBUG_SLOW_PREPARE=<seconds>``: global rank 0's data preparation takes that much longer
(the other ranks' wait for it must not be a collective that times out).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch
import torch.distributed as dist


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


def debug_slow_prepare(prepare: Callable[[], Any]) -> Any:
    delay = float(os.environ.get("KIMI_TRAIN_DEBUG_SLOW_PREPARE", "0") or 0)
    if delay and dist.is_initialized() and dist.get_rank() == 0:
        time.sleep(delay)
    return prepare()
