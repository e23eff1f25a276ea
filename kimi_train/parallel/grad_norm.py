"""Global gradient-norm clipping over parameters that live on different meshes.

``torch.nn.utils.clip_grad_norm_`` stacks the per-parameter norms, which DTensor refuses when
they sit on different meshes, as they do under expert parallelism: dense parameters on
"dp_shard", routed experts on ("efsdp", "ep"). Here the squared norm of each mesh's group is
reduced on that mesh (``full_tensor()`` of a scalar partial norm), and the groups are summed.
Under pipeline parallelism each rank holds only its stages' parameters: ``group`` (the pp group)
sums the squared norms of the stages, so every stage clips by the norm of the whole model.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .engine import collective_device


def _mesh_key(t: torch.Tensor):
    return t.device_mesh if isinstance(t, DTensor) else None


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, foreach: bool = True,
                    group: Optional[Any] = None) -> torch.Tensor:
    """Scale gradients in place so their global L2 norm is at most ``max_norm``; return that norm.

    The returned norm is a plain fp32 scalar tensor, identical on every rank (the norm of the full,
    unsharded gradients). ``max_norm`` = inf or <= 0 only measures. ``group``: ranks holding other
    parameters of the same model (pipeline stages), whose squared norms are summed in (a collective).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads and group is None:
        return torch.tensor(0.0)
    groups: dict = {}
    for g in grads:
        groups.setdefault(_mesh_key(g), []).append(g)
    total_sq = None
    for same_mesh in groups.values():
        norm = torch.nn.utils.get_total_norm(same_mesh, norm_type=2.0, foreach=foreach)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        sq = norm.float() ** 2
        total_sq = sq if total_sq is None else total_sq + sq.to(total_sq.device)
    if group is not None:
        if total_sq is None:
            total_sq = torch.zeros((), device=collective_device())
        dist.all_reduce(total_sq, op=dist.ReduceOp.SUM, group=group)
    total = total_sq.sqrt()
    if max_norm is not None and 0 < max_norm < math.inf:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            local = g.to_local() if isinstance(g, DTensor) else g
            local.mul_(coef.to(device=local.device, dtype=local.dtype))
    return total
