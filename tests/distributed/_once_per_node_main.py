"""Run by test_cluster_launch.py under torchrun: once_per_node with a leader slower than every timeout.

Each rank joins through init_distributed(timeout_s=T, init_timeout_s=T); global rank 0's work takes
SLOW > T seconds; then one all_reduce checks every rank is still in the group. A wait that were a
collective (a barrier) would time out after T seconds."""

import sys
import time

import torch
import torch.distributed as dist

from kimi_train.parallel import destroy_distributed, init_distributed, once_per_node

timeout_s, slow_s = float(sys.argv[1]), float(sys.argv[2])
rank, world, _, _ = init_distributed(timeout_s=timeout_s, init_timeout_s=timeout_s)
order = []


def prepare() -> int:
    if rank == 0:
        time.sleep(slow_s)
    order.append(time.monotonic())
    return rank


assert once_per_node(prepare, "slow") == rank
done = torch.tensor([1.0])
dist.all_reduce(done)
assert done.item() == world
print(f"rank {rank}: prepared after the leader, all_reduce ok", flush=True)
destroy_distributed()
