"""Run a function on N gloo processes on CPU (torch.multiprocessing spawn), for the tests.

A failing rank raises in the parent with the child's traceback, so pytest shows it; a rank that
dies after its work (a signal or a non-zero exit code at interpreter exit) fails the test too.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _ports import free_port
from kimi_train.parallel import destroy_distributed


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # N processes share 2 cores
    # A collective that one rank never joins (a bug) fails after 5 minutes instead of gloo's 30.
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=5))
    try:
        fn(rank, world_size, *args)
    except BaseException:
        dist.destroy_process_group()
        raise
    destroy_distributed()  # gloo's threads stop here, not during interpreter finalisation


def spawn(fn, world_size: int, *args) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
