"""Checkpoint state of a DeepSpeed (ZeRO) run, for kimi_train.loop.checkpoint (DCP, manifest, atomic).

Each rank writes what it owns, with no gather: every parameter is ONE 1-D tensor of its numel
elements (flattened, fp32: the master weights), and each of its optimizer states (momentum_buffer;
exp_avg, exp_avg_sq) likewise, as a ShardedTensor whose shards are the ranks' fragments, views
into ZeRO's flat partitions. Buffers (router biases) are whole, and so are the AdamW step counts.

    "model": {<param name>: [numel] fp32, <buffer name>: buffer}
    "optim": {"<param name>.<state key>": [numel] fp32, "adamw_step.<group>": scalar}

DCP reshards on load (shards are matched by element ranges), so a checkpoint of one ZeRO stage or
world size resumes on another. An FSDP2 checkpoint holds [out, in] DTensors and torch's optimizer
layout instead: the two engines' checkpoints do not load into each other (the trainer refuses a
change of parallel.engine in one line); ``kimi-train-export`` reads both.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

from optim.flat import Fragment, Partition


def _fragments_by_param(partitions) -> dict[str, list[tuple[int, Fragment, Partition]]]:
    out: dict[str, list] = defaultdict(list)
    for part in partitions:
        for r, frags in enumerate(part.fragments):
            for f in frags:
                out[f.name].append((r, f, part))
    return out


def _sharded(entries: list[tuple[int, Fragment, Partition]], numel: int, source, group: Any) -> ShardedTensor:
    """The flattened parameter of ``entries`` as a ShardedTensor over ``source(partition)`` (the
    master partition or one of its state tensors)."""
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    global_ranks = dist.get_process_group_ranks(group) if dist.is_initialized() else [0]
    metas, local = [], []
    for r, f, part in entries:
        tensor = source(part).detach()  # a view: loading into it writes the partition
        meta = ShardMetadata(shard_offsets=[f.param_start], shard_sizes=[f.numel],
                             placement=f"rank:{global_ranks[r]}/{tensor.device}")
        metas.append(meta)
        if r == rank:
            local.append(Shard(tensor[f.flat_start:f.flat_start + f.numel], meta))
    metadata = ShardedTensorMetadata(shards_metadata=metas, size=torch.Size([numel]),
                                     tensor_properties=TensorProperties(dtype=torch.float32))
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, metadata, process_group=group)


def _persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, m in module.named_modules():
        for name, buf in m._buffers.items():
            if buf is not None and name not in m._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def checkpoint_state(engine) -> dict[str, Any]:
    """The DCP state of a DeepSpeedEngine (views: loading into it writes the partitions)."""
    client = engine.optimizer
    group = client.process_group
    partitions = list(client.partitions.values())
    model: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    for name, entries in _fragments_by_param(partitions).items():
        numel = int(torch.Size(client.shapes[name]).numel())
        model[name] = _sharded(entries, numel, lambda part: part.tensor, group)
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if key in client.state[entries[0][2].tensor]:
                optim[f"{name}.{key}"] = _sharded(entries, numel, lambda part, key=key: client.state[part.tensor][key], group)
    for part in partitions:
        step = client.state[part.tensor].get("step")
        if step is not None:
            optim[f"adamw_step.{part.group}"] = step.clone()
    model.update(_persistent_buffers(engine.module))
    return {"model": model, "optim": optim}


@torch.no_grad()
def load_checkpoint_state(engine, state: dict[str, Any]) -> None:
    """After DCP has loaded into ``checkpoint_state(engine)``: the AdamW steps, then the master
    weights into DeepSpeed's working copies (stages 1/2: all-gathered; stage 3: the partitions)."""
    client, zero = engine.optimizer, engine.zero
    for part in client.partitions.values():
        step = state["optim"].get(f"adamw_step.{part.group}")
        if step is not None:
            client.state[part.tensor]["step"] = step.detach().to(device="cpu", dtype=torch.float32).clone()
    if engine.stage == 3:
        for s in range(len(zero.fp16_groups)):
            zero._reassign_or_swap_out_partitioned_parameters(s)
        if zero.persistent_parameters:  # small parameters ZeRO-3 keeps whole on every rank
            zero.persistent_parameters[0].all_gather(zero.persistent_parameters)
    else:
        zero.update_lp_params()


def flat_weights_state(model: torch.nn.Module) -> dict[str, Any]:
    """What to DCP-load to read this layout's weights into a plain (unsharded) ``model``: every
    parameter as the 1-D fp32 tensor it was saved as, the persistent buffers as they are."""
    weights = {name: torch.empty(p.numel(), dtype=torch.float32) for name, p in model.named_parameters()}
    return {"model": {**_persistent_buffers(model), **weights}}


@torch.no_grad()
def unflatten_weights(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """After DCP has loaded into ``flat_weights_state(model)``: the weights into their shapes."""
    for name, p in model.named_parameters():
        p.copy_(state["model"][name].view(p.shape))
