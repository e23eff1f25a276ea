"""Global gradient-norm clipping over parameters that live on different meshes.

``torch.nn.utils.clip_grad_norm_`` stacks the per-parameter norms, which DTensor refuses when
they sit on different meshes, as they do under expert parallelism: dense parameters on
"dp_shard", routed experts on ("efsdp", "ep"). Here the squared norm of each mesh's group is
reduced on that mesh (``full_tensor()`` of a scalar partial norm), and the groups are summed.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.distributed.tensor import DTensor


def _mesh_key(t: torch.Tensor):
    return t.device_mesh if isinstance(t, DTensor) else None


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, foreach: bool = True) -> torch.Tensor:
    """Scale gradients in place so their global L2 norm is at most ``max_norm``; return that norm.

    The returned norm is a plain fp32 scalar tensor, identical on every rank (the norm of the full,
    unsharded gradients). ``max_norm`` = inf or <= 0 only measures.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    groups: dict = {}
    for g in grads:
        groups.setdefault(_mesh_key(g), []).append(g)
    total_sq = None
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0, foreach=foreach)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        sq = norm.float() ** 2
        total_sq = sq if total_sq is None else total_sq + sq.to(total_sq.device)
    total = total_sq.sqrt()
    if max_norm is not None and 0 < max_norm < math.inf:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            local = g.to_local() if isinstance(g, DTensor) else g
            local.mul_(coef.to(device=local.device, dtype=local.dtype))
    return total
