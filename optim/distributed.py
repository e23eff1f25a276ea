"""Distributed Muon: orthogonalise sharded (DTensor) updates without gathering every matrix everywhere.

Newton-Schulz needs each matrix whole, but FSDP leaves every rank with a slice of every
matrix. The obvious fix (``full_tensor()`` on every rank, then the same NS everywhere: what
``torch.optim.Muon`` on DTensors and ZeRO-style Muon do) moves ``P (N-1)/N`` bytes to every
rank and repeats all of the NS work ``N`` times. Here each matrix gets ONE owner instead:

1. Plan (deterministic, identical on every rank, cached): every matrix (every expert matrix
   of a 3-D parameter counts as one) is a unit with cost ``s^2 (2l + s)`` (s = short side,
   l = long side: the FLOPs of one NS iteration up to a constant). Units are assigned to the
   ranks of their mesh longest-processing-time first, each to the least-loaded rank.
2. Forward all-to-all: every rank sends each slice it holds to the slice's owner, in ONE
   ``all_to_all_single`` over a flat buffer with variable splits per mesh.
3. Owners assemble their matrices, run NS batched by shape (one ``ns_fn`` call per shape).
4. Return all-to-all: each owner sends every rank the slice of the result it holds.

Traffic per rank ~ 2 P/N (P = bytes of the sharded matrices, N = ranks) and each NS runs once.
Parameters that are whole on every rank need no traffic: all-Replicate placements, and 3-D
expert weights sharded only on the expert dim 0 (expert parallelism, FSDP's dim-0 shards of
experts): NS runs on the local shard. Those local NS calls overlap the forward all-to-all.

Placements supported on the all-to-all path: ``Shard(d)`` and ``Replicate`` on 1-D and N-D
meshes, including uneven sizes (DTensor's chunk semantics: ceil-sized pieces, the last ones
short or empty). ``_StridedShard`` is supported where the matrices stay whole (dim 0 of a 3-D
parameter). ``Partial`` is an error: updates are reduced gradients.

This module imports torch only (``optim`` stands alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

__all__ = ["orthogonalize_dtensors", "scale_rows_", "ns_cost", "comm_stats", "CommStats"]

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (global offsets, sizes) of a local shard


@dataclass
class CommStats:
    """Bytes this rank sent/received in orthogonalize_dtensors (self-copies excluded)."""

    bytes_sent: int = 0
    bytes_recv: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.bytes_sent = self.bytes_recv = self.calls = 0


comm_stats = CommStats()


def ns_cost(n: int, m: int) -> int:
    """Relative cost of Newton-Schulz on an n x m matrix: s^2 (2l + s) per iteration."""
    s, l = min(n, m), max(n, m)
    return s * s * (2 * l + s)


# --------------------------------------------------------------------------- boxes


def _local_box(shape: Sequence[int], mesh_shape: Sequence[int], coord: Sequence[int], placements) -> Box:
    """Where the shard at mesh coordinate ``coord`` sits in the full tensor (Shard/Replicate).

    Mesh dims shard left to right; each ``Shard(d)`` splits the current extent of dim d into
    ``k`` chunks of ceil(extent/k) like ``torch.chunk`` (trailing chunks may be short or empty).
    """
    offsets, sizes = [0] * len(shape), list(shape)
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, Replicate):
            continue
        if type(p) is not Shard:
            raise NotImplementedError(f"placement {p} is not supported here; use Shard or Replicate")
        d = p.dim % len(shape)
        k, c = mesh_shape[mesh_dim], coord[mesh_dim]
        chunk = -(-sizes[d] // k) if sizes[d] else 0
        start = min(c * chunk, sizes[d])
        end = min(start + chunk, sizes[d])
        offsets[d] += start
        sizes[d] = end - start
    return tuple(offsets), tuple(sizes)


def _sharded_dims(placements, ndim: int) -> set[int]:
    return {p.dim % ndim for p in placements if isinstance(p, (Shard, _StridedShard))}


def _is_whole_locally(p: DTensor) -> bool:
    """True when every local matrix is complete: nothing sharded, or only the batch dim of a 3-D param."""
    dims = _sharded_dims(p.placements, p.ndim)
    return not dims or (p.ndim == 3 and dims == {0})


# --------------------------------------------------------------------------- groups


def _mesh_key(mesh) -> tuple:
    """Identifies a mesh by its layout (ids of dead meshes can be reused)."""
    return tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape), mesh.mesh_dim_names


def _mesh_group(mesh) -> dist.ProcessGroup:
    """A process group spanning every rank of ``mesh``, looked up on every call.

    Never cached in this module: a module-level cache keeps a gloo group alive past
    ``dist.destroy_process_group()`` until interpreter finalisation destroys it and joins its
    worker threads; a worker still finishing a collective there needs the GIL and aborts the
    process ("terminate called without an active exception"). After a re-init it would also
    hand a destroyed group to a new mesh of the same layout. The mesh owns its groups; a
    flattened submesh is created once (a collective) and then cached on its root mesh.
    """
    if mesh.ndim == 1:
        return mesh.get_group(0)
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    return mesh._flatten().get_group(0)


# --------------------------------------------------------------------------- plan


@dataclass
class _Unit:
    """One matrix to orthogonalise: parameter index in the call, expert index (3-D) or None."""

    param: int
    expert: Optional[int]
    shape: tuple[int, int]
    owner: int = -1  # group rank


@dataclass
class _MeshPlan:
    """Who owns which matrix and how many elements go where: layout only, no process group."""

    ranks: list[int]  # global ranks in the group-rank order of _mesh_group(mesh)
    me: int  # my group rank
    params: list[int]  # indices into the call's lists
    units: list[_Unit] = field(default_factory=list)
    # boxes[param][group_rank] -> Box; senders[param][group_rank] -> bool
    boxes: dict = field(default_factory=dict)
    senders: dict = field(default_factory=dict)
    send_splits: list[int] = field(default_factory=list)
    recv_splits: list[int] = field(default_factory=list)
    ret_send_splits: list[int] = field(default_factory=list)
    ret_recv_splits: list[int] = field(default_factory=list)


def _unit_block(box: Box, u: _Unit) -> Optional[Box]:
    """The part of unit u (a 2-D matrix) inside a shard's box, as a 2-D box; None if empty."""
    off, size = box
    if u.expert is not None:
        if not (off[0] <= u.expert < off[0] + size[0]):
            return None
        off, size = off[1:], size[1:]
    if 0 in size:
        return None
    return tuple(off), tuple(size)


def _build_plan(params: list[DTensor], idx: list[int]) -> _MeshPlan:
    mesh = params[idx[0]].device_mesh
    ranks = dist.get_process_group_ranks(_mesh_group(mesh))
    me = ranks.index(dist.get_rank())
    mesh_ranks = mesh.mesh
    coords = {}
    for g in ranks:
        coords[g] = [int(c) for c in (mesh_ranks == g).nonzero()[0].tolist()]
    plan = _MeshPlan(ranks=ranks, me=me, params=idx)
    for i in idx:
        p = params[i]
        boxes, senders = [], []
        rep_dims = [d for d, pl in enumerate(p.placements) if isinstance(pl, Replicate)]
        for g in ranks:
            boxes.append(_local_box(p.shape, mesh.shape, coords[g], p.placements))
            # One copy of each slice travels: the replica at coordinate 0 on Replicate dims.
            senders.append(all(coords[g][d] == 0 for d in rep_dims))
        plan.boxes[i], plan.senders[i] = boxes, senders
        mat = tuple(p.shape[-2:])
        experts = [None] if p.ndim == 2 else list(range(p.shape[0]))
        plan.units += [_Unit(i, e, mat) for e in experts]

    # Longest processing time first: biggest matrices first, each to the least-loaded rank.
    load = [0] * len(ranks)
    for u in sorted(plan.units, key=lambda u: -ns_cost(*u.shape)):
        r = min(range(len(ranks)), key=lambda r: (load[r], r))
        u.owner = r
        load[r] += ns_cost(*u.shape)

    def numel(b: Optional[Box]) -> int:
        return 0 if b is None else math.prod(b[1])

    n = len(ranks)
    plan.send_splits = [0] * n
    plan.recv_splits = [0] * n
    plan.ret_send_splits = [0] * n
    plan.ret_recv_splits = [0] * n
    for u in plan.units:
        boxes, senders = plan.boxes[u.param], plan.senders[u.param]
        if senders[me]:
            plan.send_splits[u.owner] += numel(_unit_block(boxes[me], u))
        if u.owner == me:
            for r in range(n):
                if senders[r]:
                    plan.recv_splits[r] += numel(_unit_block(boxes[r], u))
                plan.ret_send_splits[r] += numel(_unit_block(boxes[r], u))
        plan.ret_recv_splits[u.owner] += numel(_unit_block(boxes[me], u))
    return plan


_PLAN_CACHE: dict = {}  # layouts and sizes only: still valid after a destroy and re-init of the groups


def _plan_key(params: list[DTensor], idx: list[int]) -> tuple:
    # this rank's plan for positions in `params`: the same layouts at other positions need another plan
    return (dist.get_rank(), tuple(idx)) + tuple((tuple(params[i].shape), tuple(params[i].placements), _mesh_key(params[i].device_mesh)) for i in idx)


def _get_plan(params: list[DTensor], idx: list[int]) -> _MeshPlan:
    key = _plan_key(params, idx)
    if key not in _PLAN_CACHE:
        _PLAN_CACHE[key] = _build_plan(params, idx)
    return _PLAN_CACHE[key]


# --------------------------------------------------------------------------- main entry


def _a2a(plan: _MeshPlan, pg: dist.ProcessGroup, send: torch.Tensor, send_splits: list[int], recv_splits: list[int],
         async_op: bool):
    recv = send.new_empty(sum(recv_splits))
    work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=pg, async_op=async_op)
    item = send.element_size()
    comm_stats.bytes_sent += item * (sum(send_splits) - send_splits[plan.me])
    comm_stats.bytes_recv += item * (sum(recv_splits) - recv_splits[plan.me])
    return recv, work


def _slice(t: torch.Tensor, box: Box) -> torch.Tensor:
    off, size = box
    return t[tuple(slice(o, o + s) for o, s in zip(off, size))]


def _relative(blk: Box, shard_box: Box) -> Box:
    """A 2-D block in global coordinates, shifted into the coordinates of the local shard."""
    off = shard_box[0][-2:]
    return tuple(b - o for b, o in zip(blk[0], off)), blk[1]


def _run_ns_batched(mats: list[torch.Tensor], ns_fn: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """NS on a list of 3-D [b, n, m] tensors: one ns_fn call per matrix shape."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for j, x in enumerate(mats):
        by_shape.setdefault(tuple(x.shape[-2:]), []).append(j)
    out: list[Optional[torch.Tensor]] = [None] * len(mats)
    for js in by_shape.values():
        xs = [mats[j] for j in js]
        y = ns_fn(torch.cat(xs, dim=0) if len(xs) > 1 else xs[0])
        for j, part in zip(js, torch.split(y, [x.shape[0] for x in xs], dim=0)):
            out[j] = part
    return out  # type: ignore[return-value]


@torch.no_grad()
def orthogonalize_dtensors(
    updates: list[DTensor], params: list[DTensor], ns_fn: Callable[[torch.Tensor], torch.Tensor]
) -> list[torch.Tensor]:
    """Newton-Schulz of each full update matrix, returned as this rank's LOCAL shards.

    Args:
        updates: post-momentum updates, DTensors with the placements of ``params``.
        params: the parameters (2-D [n, m] or 3-D [E, n, m] expert weights); only their
            shapes, meshes and placements are read.
        ns_fn: batched Newton-Schulz, ``ns_fn(X_bnm) -> Y_bnm`` (the optimizer's settings bound).

    Returns:
        ``out[i]`` has the shape of ``updates[i].to_local()`` and equals
        ``ns_fn(full(updates[i]))`` restricted to this rank's shard. Collective: every rank of
        every parameter's mesh must call it with the same parameter list.
    """
    if len(updates) != len(params):
        raise ValueError(f"orthogonalize_dtensors got {len(updates)} updates for {len(params)} params")
    out: list[Optional[torch.Tensor]] = [None] * len(params)
    local_idx, by_mesh = [], {}
    for i, (u, p) in enumerate(zip(updates, params)):
        if p.ndim not in (2, 3):
            raise ValueError(f"Muon parameter {i} has shape {tuple(p.shape)}; valid: 2-D [n, m] or 3-D [E, n, m]")
        if not isinstance(u, DTensor):
            local_idx.append(i)
            continue
        if tuple(u.placements) != tuple(p.placements):
            raise ValueError(f"update {i} placements {u.placements} differ from the parameter's {p.placements}")
        if any(pl.is_partial() for pl in u.placements):
            raise ValueError(f"update {i} has Partial placements {u.placements}; reduce gradients first")
        if _is_whole_locally(u):
            local_idx.append(i)
            continue
        if any(isinstance(pl, _StridedShard) for pl in u.placements):
            raise NotImplementedError(f"update {i}: {u.placements} splits matrices in strides; unsupported")
        if u.device_mesh.get_coordinate() is None:
            continue  # this rank is not part of that parameter's mesh
        by_mesh.setdefault((u.device_mesh, u.dtype), []).append(i)

    # Forward all-to-all per mesh, launched async so the local NS below overlaps it.
    pending = []
    for (mesh, dtype), idx in by_mesh.items():
        plan, pg = _get_plan(updates, idx), _mesh_group(mesh)
        comm_stats.calls += 1
        chunks: list[list[torch.Tensor]] = [[] for _ in plan.ranks]
        for u in plan.units:
            my_box = plan.boxes[u.param][plan.me]
            blk = _unit_block(my_box, u)
            if blk is None or not plan.senders[u.param][plan.me]:
                continue
            local = updates[u.param].to_local()
            if u.expert is not None:
                local = local[u.expert - my_box[0][0]]
            chunks[u.owner].append(_slice(local, _relative(blk, my_box)).reshape(-1))
        flat = [c for cs in chunks for c in cs]
        send = torch.cat(flat) if flat else updates[idx[0]].to_local().new_empty(0)
        recv, work = _a2a(plan, pg, send.to(dtype), plan.send_splits, plan.recv_splits, async_op=True)
        pending.append((plan, pg, recv, work, dtype))

    local_mats = []
    for i in local_idx:
        x = updates[i].to_local() if isinstance(updates[i], DTensor) else updates[i]
        local_mats.append(x if x.ndim == 3 else x.unsqueeze(0))
    for i, y in zip(local_idx, _run_ns_batched(local_mats, ns_fn)):
        out[i] = y if updates[i].ndim == 3 else y.squeeze(0)

    for plan, pg, recv, work, dtype in pending:
        work.wait()
        # Assemble the matrices this rank owns; source-major order, units in plan order.
        mine = [u for u in plan.units if u.owner == plan.me]
        full = [torch.empty(u.shape, dtype=dtype, device=recv.device) for u in mine]
        pos = 0
        for r in range(len(plan.ranks)):
            for u, f in zip(mine, full):
                if not plan.senders[u.param][r]:
                    continue
                blk = _unit_block(plan.boxes[u.param][r], u)
                if blk is None:
                    continue
                k = math.prod(blk[1])
                _slice(f, blk).copy_(recv[pos : pos + k].view(blk[1]))
                pos += k
        results = _run_ns_batched([f.unsqueeze(0) for f in full], ns_fn)
        results = [y.squeeze(0) for y in results]

        # Return all-to-all: destination-major, units in plan order.
        parts = []
        for r in range(len(plan.ranks)):
            for u, y in zip(mine, results):
                blk = _unit_block(plan.boxes[u.param][r], u)
                if blk is not None:
                    parts.append(_slice(y, blk).reshape(-1))
        send = torch.cat(parts).to(dtype) if parts else recv.new_empty(0)
        back, work = _a2a(plan, pg, send, plan.ret_send_splits, plan.ret_recv_splits, async_op=False)

        local_out = {i: torch.empty_like(updates[i].to_local()) for i in plan.params}
        pos = 0
        for r in range(len(plan.ranks)):
            for u in plan.units:
                if u.owner != r:
                    continue
                my_box = plan.boxes[u.param][plan.me]
                blk = _unit_block(my_box, u)
                if blk is None:
                    continue
                k = math.prod(blk[1])
                dst = local_out[u.param]
                if u.expert is not None:
                    dst = dst[u.expert - my_box[0][0]]
                _slice(dst, _relative(blk, my_box)).copy_(back[pos : pos + k].view(blk[1]))
                pos += k
        for i, t in local_out.items():
            out[i] = t
    for i in range(len(out)):
        if out[i] is None:  # a rank outside a parameter's mesh holds no shard
            out[i] = updates[i].to_local().clone()
    return out  # type: ignore[return-value]


@torch.no_grad()
def scale_rows_(w: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """In place ``w[r, ...] *= row_scale[r]`` for a weight that may be a DTensor.

    ``row_scale`` covers every row of the FULL weight (shape [w.shape[0]]); each rank scales
    the rows of its shard (a head's rows may span two shards: each side scales its part).
    Works for Replicate and Shard(d) placements (rows are global row indices either way).
    """
    if row_scale.shape != (w.shape[0],):
        raise ValueError(f"row_scale has shape {tuple(row_scale.shape)}; expected ({w.shape[0]},) for weight {tuple(w.shape)}")
    if not isinstance(w, DTensor):
        # the scale stays at >= fp32: rounding gamma^0.5 to bf16 would miss tau
        w.mul_(row_scale.to(device=w.device, dtype=torch.promote_types(w.dtype, torch.float32)).view(-1, *([1] * (w.ndim - 1))))
        return w
    coord = w.device_mesh.get_coordinate()
    if coord is None:
        return w
    if any(isinstance(p, _StridedShard) for p in w.placements):
        raise NotImplementedError(f"scale_rows_ on placements {w.placements}; supported: Shard, Replicate")
    (off, size) = _local_box(w.shape, w.device_mesh.shape, coord, w.placements)
    local = w.to_local()
    scale = row_scale.to(device=local.device, dtype=torch.promote_types(local.dtype, torch.float32))[off[0] : off[0] + size[0]]
    local.mul_(scale.view(-1, *([1] * (local.ndim - 1))))
    return w
