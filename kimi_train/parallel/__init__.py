"""Parallelism applied to the model from outside: process group, device mesh, FSDP2, EP.

The trainer uses exactly this API; a single process (no torchrun) is world size 1,
where every function here is a no-op.

    rank, world_size, local_rank, device = init_distributed()
    dims = ParallelDims.from_config(cfg.parallel, world_size, model_cfg)   # validates
    mesh = dims.build_mesh(device.type)          # None when world_size == 1
    model = parallelize_model(model, dims, mesh, mixed_precision=...)
    dims.dp_rank, dims.dp_size                   # data sharding
    dims.dp_group                                # max-logit / expert-load all-reduce (None: single process)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


def init_distributed(backend: Optional[str] = None) -> tuple[int, int, int, torch.device]:
    """Initialise torch.distributed when launched by torchrun; return (rank, world, local_rank, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size, local_rank, device


@dataclass
class ParallelDims:
    world_size: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: Any = None

    @classmethod
    def from_config(cls, parallel_cfg: Any, world_size: int, model_cfg: Any = None) -> "ParallelDims":
        if world_size != 1:
            raise NotImplementedError("multi-process training lands with the distributed issue")
        return cls()

    def build_mesh(self, device_type: str):
        return None


def parallelize_model(model: torch.nn.Module, dims: ParallelDims, mesh: Any, mixed_precision: bool = False):
    return model
