"""The spawner (kimi_train.parallel.spawn): every rank exits cleanly, every time.

A rank that leaves its gloo groups to interpreter finalisation can abort there ("terminate called
without an active exception", SIGABRT) after its work succeeded: 3 runs in 19 of a benchmark test
whose workers skipped destroy_distributed. The worker below does what those did (a device mesh,
DTensor redistributions, async functional collectives, a broadcast last); 20 spawns in a row must
all exit 0. With the spawner's teardown replaced by a bare destroy_process_group, the 2nd spawn
aborted here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from _spawn import spawn

SPAWNS = 20


def _worker(rank: int, world: int, i: int) -> float:
    mesh = init_device_mesh("cpu", (world,))
    x = DTensor.from_local(torch.randn(64, 32, generator=torch.Generator().manual_seed(rank)), mesh, [Shard(0)])
    full = x.redistribute(mesh, [Replicate()]).to_local()
    gathered = funcol.all_gather_single(full, 0, mesh)
    total = float(gathered.sum())
    out = torch.tensor([total])
    dist.broadcast(out, 0)  # the smoke runs that aborted ended on a broadcast
    return float(out) + i


def test_spawn_returns_every_ranks_value_and_exits_cleanly_20_times():
    for i in range(SPAWNS):
        values = spawn(_worker, 2, i)  # raises ProcessExitedException if a rank aborts at exit
        assert len(values) == 2 and values[0] == values[1], (i, values)
