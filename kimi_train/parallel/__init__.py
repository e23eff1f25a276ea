"""Parallelism applied to the model from outside: process group, device mesh, FSDP2, EP.

The trainer uses exactly this API; a single process (no torchrun) is world size 1,
where every function here is a no-op. Under torchrun even one rank initialises the process
group (NCCL on CUDA) and gets FSDP2, so `torchrun --nproc_per_node 1` on one GPU runs the
multi-GPU code path (tests/distributed/test_torchrun_one_rank.py).

    rank, world_size, local_rank, device = init_distributed()
    dims = ParallelDims.from_config(cfg.parallel, world_size, model_cfg)   # validates
    mesh = dims.build_mesh(device.type)          # None when world_size == 1
    model = parallelize_model(model, dims, mesh, mixed_precision=...)   # EP, then FSDP2
    engine = build_engine(cfg, model, dims, mesh, device, accum, mixed_precision)   # what the trainer drives
    dims.dp_rank, dims.dp_size                   # data sharding
    dims.dp_group                                # max-logit / expert-load all-reduce (None: single process)
    grad_norm = clip_grad_norm_(model.parameters(), max_norm)   # works across the EP and dense meshes
    destroy_distributed()                        # after a successful distributed run: no gloo thread left

See docs/distributed.md for the mesh layout, the EP gradient-scaling trap and how to launch.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any, Optional

import torch
import torch.distributed as dist

# Before any process group exists: this module binds its functions' default `group=group.WORLD`
# at import, and imported after init_process_group it would hold the world group until exit.
import torch.distributed.nn.functional  # noqa: F401

from .dims import ParallelDims
from .grad_norm import clip_grad_norm_

__all__ = ["init_distributed", "destroy_distributed", "ParallelDims", "build_engine", "parallelize_model", "apply_ep",
           "apply_fsdp", "clip_grad_norm_"]


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ  # torchrun (torch.distributed.run) sets it for every rank


def init_distributed(backend: Optional[str] = None) -> tuple[int, int, int, torch.device]:
    """Initialise torch.distributed when launched by torchrun (also with one rank) or with
    WORLD_SIZE > 1; return (rank, world, local_rank, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if (world_size > 1 or launched_by_torchrun()) and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size, local_rank, device


def destroy_distributed() -> None:
    """Destroy the process groups and stop their gloo worker threads now, after a successful run.

    ``dist.destroy_process_group()`` only unregisters the groups; a gloo group stops its worker
    threads when its last reference goes. torch keeps device meshes in module-level caches
    (DTensor's redistribute planner and transform caches) and a mesh keeps its groups, so they
    would die during interpreter finalisation instead. A worker thread still freeing a finished
    collective's tensors there needs the GIL; Python 3.11 ends it with pthread_exit, whose unwind
    through a noexcept C++ destructor aborts the process ("terminate called without an active
    exception": 5 of 22 torchrun smoke runs, after their last collective, a broadcast). Here
    every mesh lets go of its groups and a collection frees the caller's dropped objects that
    held them, so the groups die while the interpreter is alive, each joining its workers. Not
    for error paths: joining waits for any collective still in flight. Call it after a distributed
    run; it also releases the groups of a process group that something else destroyed already.
    """
    from torch.distributed.device_mesh import DeviceMesh

    if dist.is_initialized():
        dist.destroy_process_group()
    _release_deepspeed_groups()
    for obj in gc.get_objects():
        if type(obj) is DeviceMesh:  # outside torch.compile, get_group() resolves groups by name
            getattr(obj, "_pg_registry", {}).clear()
    gc.collect()


def _release_deepspeed_groups() -> None:
    """DeepSpeed keeps the groups it creates in module globals (``deepspeed.utils.groups``), which
    would also outlive the interpreter's last moments: let go of them the same way."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.endswith("_GROUP"):
            setattr(groups, name, {} if isinstance(value, dict) else None)


def build_engine(cfg: Any, model: torch.nn.Module, dims: ParallelDims, mesh: Any, device: torch.device,
                 accum: int, mixed_precision: bool):
    """The training engine (``engine.TrainEngine``) that parallel.engine names, wrapped around
    ``model``: FSDP2 (with EP; in one process the plain model) or DeepSpeed ZeRO."""
    if cfg.parallel.engine == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, dims, device, accum)
    from .fsdp_engine import FSDP2Engine

    return FSDP2Engine(cfg, model, dims, mesh, mixed_precision)


def __getattr__(name: str):  # lazy: keep `import kimi_train.parallel` light for single-process runs
    if name == "apply_ep":
        from .expert_parallel import apply_ep

        return apply_ep
    if name in ("apply_fsdp", "parallelize_model"):
        from . import fsdp

        return getattr(fsdp, name)
    raise AttributeError(name)
