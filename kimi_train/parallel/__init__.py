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
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

# Before any process group exists: this module binds its functions' default `group=group.WORLD`
# at import, and imported after init_process_group it would hold the world group until exit.
import torch.distributed.nn.functional  # noqa: F401

from kimi_train.errors import UserError

from .dims import ParallelDims
from .grad_norm import clip_grad_norm_

T = TypeVar("T")

__all__ = ["init_distributed", "destroy_distributed", "once_per_node", "ParallelDims", "build_engine",
           "parallelize_model", "apply_ep", "apply_fsdp", "clip_grad_norm_"]


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ  # torchrun (torch.distributed.run) sets it for every rank


_STORE: Any = None  # the rendezvous store of this process's group: once_per_node waits on it


def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0,
                     init_timeout_s: float = 1800.0, store: Any = None) -> tuple[int, int, int, torch.device]:
    """Initialise torch.distributed when launched by torchrun (also with one rank), with
    WORLD_SIZE > 1, or with a ``store`` given; return (rank, world, local_rank, device).

    ``init_timeout_s`` bounds the rendezvous (every rank joining), ``timeout_s`` every collective
    after it. ``store``: a store already shared by the ranks (the spawner's FileStore, a one-rank
    HashStore) instead of the env:// rendezvous; RANK and WORLD_SIZE come from the environment. Raises UserError (one line) for a launch that cannot work: several SLURM tasks without
    a launcher that sets WORLD_SIZE, or a LOCAL_RANK with no GPU of its own."""
    global _STORE
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        raise UserError(
            f"SLURM_NTASKS={os.environ['SLURM_NTASKS']} but WORLD_SIZE is unset: srun started independent "
            "single-process runs; start one torchrun per node (launch/slurm.sbatch), or unset SLURM_NTASKS")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise UserError(
                f"LOCAL_RANK={local_rank} but this node has {visible} visible GPU(s) (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most {visible} processes per node "
                "(torchrun --nproc_per_node gpu)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if (world_size > 1 or launched_by_torchrun() or store is not None) and not dist.is_initialized():
        if store is None:
            store, rank, size = next(dist.rendezvous("env://", timeout=timedelta(seconds=init_timeout_s)))
        else:
            rank, size = int(os.environ.get("RANK", "0")), world_size
        store.set_timeout(timedelta(seconds=timeout_s))
        # What init_process_group(init_method="env://") does, with the two timeouts apart.
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"),
                                store=dist.PrefixStore("default_pg", store), rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout_s))
        _STORE = dist.PrefixStore("kimi_train", store)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size, local_rank, device


def once_per_node(fn: Callable[[], T], what: str) -> T:
    """``fn()`` on every rank, first on global rank 0, then on each other node's local rank 0, then on
    the rest, for one-time work that leaves a cache behind (a tokenizer, tokenized data).

    So a cache is built once on a shared filesystem, once per node on node-local disks, and never
    by two ranks of a node at once. The others wait on the rendezvous store, not in a collective, so
    a preparation longer than parallel.timeout_s does not time the job out. An error in a leader's
    ``fn`` is raised on every rank that waits for it (as UserError when it was one). The process
    group must be init_distributed's (its store is where the ranks wait)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    if _STORE is None:
        raise RuntimeError("once_per_node: the process group was not made by kimi_train.parallel.init_distributed")
    rank = dist.get_rank()
    node_leader = rank - int(os.environ.get("LOCAL_RANK", "0"))
    if rank == 0:
        waits_for = []
    elif rank == node_leader:
        waits_for = [0]
    else:
        waits_for = [node_leader]
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun keeps its store across restarts
    key = f"once/{attempt}/{what}/"
    for leader in waits_for:
        _wait_for(key + str(leader), leader, what)
    try:
        result = fn()
    except BaseException as e:
        if rank == node_leader:
            _STORE.set(key + str(rank), f"{type(e).__name__}: {e}")
        raise
    if rank == node_leader:
        _STORE.set(key + str(rank), "")
    return result


def _wait_for(key: str, leader: int, what: str) -> None:
    """Wait (polling the store, no collective, no deadline) until rank ``leader`` finished ``what``."""
    import time

    while True:
        try:
            _STORE.wait([key], timedelta(seconds=30))
            break
        except (RuntimeError, dist.DistStoreError):  # the store's wait timed out: still preparing
            time.sleep(0.1)
    outcome = _STORE.get(key).decode()
    if outcome:
        kind, _, message = outcome.partition(": ")
        if kind == "UserError":
            raise UserError(message)
        raise RuntimeError(f"rank {leader} failed to prepare {what}: {outcome}")


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
    ``model``: FSDP2 (with EP; in one process the plain model), pipeline stages of FSDP2 (parallel.pp
    > 1) or DeepSpeed ZeRO. Activation checkpointing (train.activation_checkpointing) is applied
    first, the same for all (per decoder layer, so a stage's layers keep it)."""
    t = cfg.train
    if t.activation_checkpointing != "none":
        from .activation_checkpoint import apply_activation_checkpointing

        apply_activation_checkpointing(model, t.activation_checkpointing, t.recompute_moe_down_proj)
    if cfg.parallel.engine == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, dims, device, accum, mixed_precision)
    if dims.pp > 1:
        from .pipeline_engine import PipelineEngine

        return PipelineEngine(cfg, model, dims, mesh, device, accum, mixed_precision)
    from .fsdp_engine import FSDP2Engine

    return FSDP2Engine(cfg, model, dims, mesh, device, mixed_precision)


def __getattr__(name: str):  # lazy: keep `import kimi_train.parallel` light for single-process runs
    if name == "apply_ep":
        from .expert_parallel import apply_ep

        return apply_ep
    if name in ("apply_fsdp", "parallelize_model"):
        from . import fsdp

        return getattr(fsdp, name)
    raise AttributeError(name)
