"""Run a function on N local processes, each with its process group: the one spawner of the tests
and the benchmarks.

    from kimi_train.parallel.spawn import spawn
    results = spawn(fn, world_size, *args)   # fn(rank, world_size, *args) on every rank
    results[r]                               # what fn returned on rank r (picklable)

- Rendezvous through a ``FileStore`` in a fresh temporary directory: no TCP port is picked, so
  two spawns (two pytest workers, a benchmark beside the suite) can never race for one.
- Every rank gets RANK, WORLD_SIZE and LOCAL_RANK in its environment, so code that reads them
  (``init_distributed``, the ``Trainer``) runs in-process on a spawned rank and finds the group
  already initialised.
- After ``fn`` returns, the rank tears down through ``destroy_distributed``: the gloo worker
  threads stop while the interpreter is alive. A bare ``dist.destroy_process_group()`` leaves
  them to interpreter finalisation, where a rank can abort ("terminate called without an
  active exception", SIGABRT): a spawn site that skipped this made a benchmark test fail 3 runs
  in 19. A rank that raises only unregisters its groups (joining its threads could wait on a
  peer's collective); the parent reports its traceback either way.
- A rank that dies after its work (a signal, a non-zero exit code at interpreter exit) makes
  ``spawn`` raise too (torch.multiprocessing's ProcessExitedException).
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["spawn"]


def _entry(rank: int, world_size: int, workdir: str, backend: str, timeout_s: float, threads: Optional[int],
           fn: Callable, args: tuple) -> None:
    from kimi_train.parallel import destroy_distributed, init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if threads is not None:
        torch.set_num_threads(threads)
    # The trainer's own initialisation (rank r on cuda:r where there is a GPU), on a FileStore.
    init_distributed(backend, timeout_s=timeout_s, store=dist.FileStore(os.path.join(workdir, "store"), world_size))
    try:
        result = fn(rank, world_size, *args)
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    Path(workdir, f"result{rank}.pkl").write_bytes(pickle.dumps(result))
    destroy_distributed()


def spawn(fn: Callable, world_size: int, *args: Any, backend: str = "gloo", timeout_s: float = 300.0,
          threads: Optional[int] = 1) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` new processes; their return values.

    fn must be importable (a module-level function) and args picklable. backend: "gloo", or
    "nccl" (rank r on cuda:r). timeout_s: a collective that a rank never joins (a bug) fails
    after this long instead of gloo's 30 minutes. threads: torch's intra-op threads per rank
    (1: N ranks share the machine's cores), None leaves torch's default.
    """
    workdir = tempfile.mkdtemp(prefix="kimi_train_spawn_")
    try:
        mp.spawn(_entry, args=(world_size, workdir, backend, timeout_s, threads, fn, args), nprocs=world_size,
                 join=True)
        return [pickle.loads(Path(workdir, f"result{r}.pkl").read_bytes()) for r in range(world_size)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
