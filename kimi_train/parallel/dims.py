"""Parallel dimensions: validated against the world size and the model, then turned into a mesh.

Layout (torchtitan-like; no tensor parallelism):

    world = pp * dp_replicate * dp_shard       dp_shard = efsdp * ep   (EP borrows from dp_shard)

    mesh dims ("dp_replicate", "efsdp", "ep"), plus the flattened ("efsdp", "ep") -> "dp_shard";
    with pp > 1 a leading "pp" dim, and ("dp_replicate", "efsdp", "ep") flattened -> "dp"

- Pipeline stages: "pp" is the outermost dim, so a stage's data-parallel ranks (its "dp" group:
  the loader's slice, the loss mean, the max-logit and expert-count reductions, Muon's owner
  exchange through the parameters' meshes) are consecutive ranks, and the stage-to-stage
  activations cross nodes when a stage's group fills a node. Without PP the dp group is the world.

- Dense parameters: FSDP over "dp_shard" (HSDP over ("dp_replicate", "dp_shard") when
  dp_replicate > 1).
- Routed experts [E, out, in]: Shard(0) over "ep" (E/ep whole experts per rank), then FSDP
  over "efsdp" (and replicated over "dp_replicate").
- "ep" is the innermost dim, so an EP group is consecutive ranks (one node when ep <= GPUs
  per node): the token all-to-all stays on NVLink.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from kimi_train.errors import UserError


class LayoutError(UserError, ValueError):
    """parallel.* sizes that do not fit the world size or the model: one line naming them."""


def _get(cfg: Any, key: str, default: int) -> int:
    if cfg is None:
        return default
    value = cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)
    return default if value is None else value


@dataclass
class ParallelDims:
    """Sizes of each parallel dimension (after inference) and this rank's data-parallel place."""

    world_size: int = 1
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: Any = None
    pp_rank: int = 0
    pp_group: Any = None  # set by build_mesh when pp > 1
    mesh: Any = field(default=None, repr=False)

    @property
    def efsdp(self) -> int:
        """FSDP degree of the routed experts: the part of dp_shard that EP does not take."""
        return self.dp_shard // self.ep

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_config(cls, parallel_cfg: Any, world_size: int, model_cfg: Any = None) -> "ParallelDims":
        """Infer -1 sizes and validate; raises LayoutError (one line) before any collective."""
        pp = _get(parallel_cfg, "pp", 1)
        dp_replicate = _get(parallel_cfg, "dp_replicate", 1)
        dp_shard = _get(parallel_cfg, "dp_shard", -1)
        ep = _get(parallel_cfg, "ep", 1)
        for key, value in (("pp", pp), ("dp_replicate", dp_replicate), ("ep", ep)):
            if not (isinstance(value, int) and value >= 1):
                raise LayoutError(f"parallel.{key}={value!r}; valid: an int >= 1")
        if not (isinstance(dp_shard, int) and (dp_shard >= 1 or dp_shard == -1)):
            raise LayoutError(f"parallel.dp_shard={dp_shard!r}; valid: an int >= 1, or -1 to infer")
        if world_size % (pp * dp_replicate):
            what = f"parallel.pp * parallel.dp_replicate = {pp} * {dp_replicate}" if pp > 1 else \
                f"parallel.dp_replicate={dp_replicate}"
            raise LayoutError(f"{what} does not divide the world size {world_size}")
        if dp_shard == -1:
            dp_shard = world_size // (pp * dp_replicate)
        if pp * dp_replicate * dp_shard != world_size:
            names, sizes = ["dp_replicate", "dp_shard"], [dp_replicate, dp_shard]
            if pp > 1:
                names, sizes = ["pp", *names], [pp, *sizes]
            raise LayoutError(
                f"{' * '.join('parallel.' + n for n in names)} = {' * '.join(map(str, sizes))} = "
                f"{pp * dp_replicate * dp_shard}, but the world size is {world_size}; set dp_shard=-1 to infer it"
            )
        if dp_shard % ep:
            raise LayoutError(f"parallel.ep={ep} must divide parallel.dp_shard={dp_shard} (EP borrows from dp_shard)")
        if ep > 1 and model_cfg is not None:
            experts = getattr(model_cfg, "n_routed_experts", 0) or 0
            if experts == 0:
                raise LayoutError(f"parallel.ep={ep} but the model has no routed experts; use ep=1")
            if experts % ep:
                raise LayoutError(f"parallel.ep={ep} must divide model.n_routed_experts={experts}")
        distributed = dist.is_available() and dist.is_initialized()  # torchrun: also with one rank
        rank = dist.get_rank() if distributed else 0
        dp_size = world_size // pp
        return cls(
            world_size=world_size,
            pp=pp,
            dp_replicate=dp_replicate,
            dp_shard=dp_shard,
            ep=ep,
            dp_rank=rank % dp_size,  # "pp" is the outermost mesh dim (build_mesh sets the group)
            dp_size=dp_size,
            dp_group=dist.group.WORLD if distributed and pp == 1 else None,
            pp_rank=rank // dp_size,
        )

    def build_mesh(self, device_type: str):
        """The ("dp_replicate", "efsdp", "ep") mesh with "dp_shard" flattened (with a leading "pp"
        dim when pp > 1, which also sets ``dp_group``, ``pp_group`` and ``pp_rank``); None for one
        process without a process group (a 1-rank torchrun has one: FSDP2 over a 1-rank mesh)."""
        if self.world_size == 1 and not (dist.is_available() and dist.is_initialized()):
            return None
        from torch.distributed.device_mesh import init_device_mesh

        shape, names = (self.dp_replicate, self.efsdp, self.ep), ("dp_replicate", "efsdp", "ep")
        if self.pp > 1:
            shape, names = (self.pp, *shape), ("pp", *names)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        mesh["efsdp", "ep"]._flatten("dp_shard")
        if self.pp > 1:
            dp = mesh["dp_replicate", "efsdp", "ep"]._flatten("dp")
            self.dp_group, self.dp_rank = dp.get_group(), dp.get_local_rank()
            self.pp_group, self.pp_rank = mesh["pp"].get_group(), mesh["pp"].get_local_rank()
            if self.dp_replicate > 1:
                # optim.distributed reduces over a 2-D (HSDP) mesh through its flattened group, made
                # at the first step that needs it; a group is made by every rank of the world, and a
                # stage without routed experts would never ask for the experts': make both now.
                self.dense_mesh(mesh)._flatten()
                self.expert_fsdp_mesh(mesh)._flatten()
        self.mesh = mesh
        return mesh

    def dense_mesh(self, mesh):
        """Mesh FSDP uses for dense parameters: dp_shard, or (dp_replicate, dp_shard) for HSDP."""
        with warnings.catch_warnings():
            # torch 2.13 warns that slicing a flattened dim from the root "will be deprecated";
            # it is the documented way to get the 2-D HSDP mesh here and works.
            warnings.filterwarnings("ignore", message="Slicing a flattened dim")
            return mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else mesh["dp_shard"]

    def expert_fsdp_mesh(self, mesh):
        """Mesh FSDP uses for routed experts (after EP took the "ep" dim)."""
        return mesh["dp_replicate", "efsdp"] if self.dp_replicate > 1 else mesh["efsdp"]

