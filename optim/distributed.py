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

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

__all__ = ["orthogonalize_", "orthogonalize_dtensors", "scale_rows_", "ns_cost", "comm_stats", "CommStats", "BUCKET_NUMEL"]

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


Key = tuple  # an index into a local tensor: (expert?, row slice, column slice)
Piece = tuple[int, Key, tuple[int, int]]  # (param or slot, key, block shape)


@dataclass
class _Bucket:
    """A slice of the plan that travels in one all-to-all each way.

    Every list is in buffer order: ``send``/``ret_recv`` destination- resp. source-major over
    this rank's local shards; ``recv``/``ret_send`` over the owned matrices (slots).
    ``slots``: the owned units, grouped into NS batches by wide shape: batches[(n, m)] ->
    slot ids; slot_pos[slot] -> (batch key, position, tall).
    """

    send: list[Piece] = field(default_factory=list)
    recv: list[Piece] = field(default_factory=list)
    ret_send: list[Piece] = field(default_factory=list)
    ret_recv: list[Piece] = field(default_factory=list)
    send_splits: list[int] = field(default_factory=list)
    recv_splits: list[int] = field(default_factory=list)
    ret_send_splits: list[int] = field(default_factory=list)
    ret_recv_splits: list[int] = field(default_factory=list)
    batches: dict = field(default_factory=dict)
    slot_pos: list[tuple[tuple[int, int], int, bool]] = field(default_factory=list)


@dataclass
class _MeshPlan:
    """Who owns which matrix and what goes where: layout only, no process group."""

    ranks: list[int]  # global ranks in the group-rank order of _mesh_group(mesh)
    me: int  # my group rank
    params: list[int]  # indices into the call's lists
    buckets: list[_Bucket] = field(default_factory=list)
    signature: str = ""  # what every rank must agree on


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


def _box_key(blk: Box, origin: Sequence[int] = (0, 0)) -> Key:
    return tuple(slice(o - z, o - z + s) for o, s, z in zip(blk[0], blk[1], origin))


def _local_key(u: _Unit, blk: Box, shard_box: Box) -> Key:
    """Index of unit u's block ``blk`` (global 2-D box) inside the local shard ``shard_box``."""
    key = _box_key(blk, shard_box[0][-2:])
    return key if u.expert is None else (u.expert - shard_box[0][0],) + key


def _assign_owners(units: list[_Unit], load: list[int]) -> None:
    """Longest processing time first: biggest matrices first, each to the least-loaded rank.
    Balanced within the bucket (a bucket's results return once its slowest owner is done),
    ties broken by the load carried over from earlier buckets."""
    local = [0] * len(load)
    for u in sorted(units, key=lambda u: -ns_cost(*u.shape)):
        r = min(range(len(load)), key=lambda r: (local[r], load[r], r))
        u.owner = r
        local[r] += ns_cost(*u.shape)
        load[r] += ns_cost(*u.shape)


def _build_plan(params: list[DTensor], idx: list[int], bucket_numel: int) -> _MeshPlan:
    mesh = params[idx[0]].device_mesh
    ranks = dist.get_process_group_ranks(_mesh_group(mesh))
    me = ranks.index(dist.get_rank())
    coords = {g: [int(c) for c in (mesh.mesh == g).nonzero()[0].tolist()] for g in ranks}
    plan = _MeshPlan(ranks=ranks, me=me, params=idx)
    boxes, senders, units = {}, {}, []
    for i in idx:
        p = params[i]
        rep_dims = [d for d, pl in enumerate(p.placements) if isinstance(pl, Replicate)]
        boxes[i] = [_local_box(p.shape, mesh.shape, coords[g], p.placements) for g in ranks]
        # One copy of each slice travels: the replica at coordinate 0 on Replicate dims.
        senders[i] = [all(coords[g][d] == 0 for d in rep_dims) for g in ranks]
        experts = [None] if p.ndim == 2 else list(range(p.shape[0]))
        units += [_Unit(i, e, tuple(p.shape[-2:])) for e in experts]

    # Buckets in parameter order (the order gradients are ready in), ~bucket_numel each.
    chunks, cur, size = [], [], 0
    for u in units:
        cur.append(u)
        size += u.shape[0] * u.shape[1]
        if size >= bucket_numel:
            chunks.append(cur)
            cur, size = [], 0
    if cur:
        chunks.append(cur)
    load = [0] * len(ranks)
    n = len(ranks)
    for chunk in chunks:
        _assign_owners(chunk, load)
        b = _Bucket(send_splits=[0] * n, recv_splits=[0] * n, ret_send_splits=[0] * n, ret_recv_splits=[0] * n)
        mine = [u for u in chunk if u.owner == me]
        for slot, u in enumerate(mine):
            wide = (min(u.shape), max(u.shape))
            b.batches.setdefault(wide, []).append(slot)
            b.slot_pos.append((wide, len(b.batches[wide]) - 1, u.shape[0] > u.shape[1]))
        for r in range(n):  # what I send to r: my blocks of r's units (destination-major)
            for u in chunk:
                blk = _unit_block(boxes[u.param][me], u)
                if u.owner == r and blk is not None and senders[u.param][me]:
                    b.send.append((u.param, _local_key(u, blk, boxes[u.param][me]), blk[1]))
                    b.send_splits[r] += math.prod(blk[1])
        for r in range(n):  # what r sends me (source-major), and what I return to r
            for slot, u in enumerate(mine):
                blk = _unit_block(boxes[u.param][r], u)
                if blk is None:
                    continue
                if senders[u.param][r]:
                    b.recv.append((slot, _box_key(blk), blk[1]))
                    b.recv_splits[r] += math.prod(blk[1])
                b.ret_send.append((slot, _box_key(blk), blk[1]))
                b.ret_send_splits[r] += math.prod(blk[1])
        for r in range(n):  # what r returns to me: my blocks of r's units
            for u in chunk:
                blk = _unit_block(boxes[u.param][me], u)
                if u.owner == r and blk is not None:
                    b.ret_recv.append((u.param, _local_key(u, blk, boxes[u.param][me]), blk[1]))
                    b.ret_recv_splits[r] += math.prod(blk[1])
        plan.buckets.append(b)
    layout = [(tuple(params[i].shape), str(params[i].placements)) for i in idx]
    owners = [u.owner for u in units]
    plan.signature = repr((ranks, tuple(mesh.mesh.shape), layout, owners, [len(c) for c in chunks]))
    return plan


def _check_same_plan(plan: _MeshPlan, pg: dist.ProcessGroup, device: torch.device) -> None:
    """Every rank of the group must have planned the same matrices, else the all-to-alls would
    pair up mismatched buffers (a hang or garbage): one collective on a fixed-size digest."""
    digest = int.from_bytes(hashlib.sha256(plan.signature.encode()).digest()[:7], "little")
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in plan.ranks]
    dist.all_gather(every, mine, group=pg)
    differ = [plan.ranks[r] for r, t in enumerate(every) if int(t.item()) != digest]
    if differ:
        raise ValueError(
            f"optim.distributed: rank {dist.get_rank()} planned other Muon matrices than ranks {differ} "
            f"({len(plan.params)} sharded parameters here); every rank must step the same parameters, in the "
            f"same order, with the same shapes and placements"
        )


_PLAN_CACHE: dict = {}  # layouts and sizes only: still valid after a destroy and re-init of the groups
BUCKET_NUMEL = 1 << 22  # matrix elements per all-to-all bucket (8 MB in bf16); two buckets are in flight


def _plan_key(params: list[DTensor], idx: list[int], bucket_numel: int) -> tuple:
    # this rank's plan for positions in `params`: the same layouts at other positions need another plan
    return (dist.get_rank(), tuple(idx), bucket_numel) + tuple(
        (tuple(params[i].shape), tuple(params[i].placements), _mesh_key(params[i].device_mesh)) for i in idx
    )


def _get_plan(params: list[DTensor], idx: list[int], pg: dist.ProcessGroup, bucket_numel: int) -> _MeshPlan:
    key = _plan_key(params, idx, bucket_numel)
    if key not in _PLAN_CACHE:
        plan = _build_plan(params, idx, bucket_numel)
        _check_same_plan(plan, pg, params[idx[0]].to_local().device)
        _PLAN_CACHE[key] = plan
    return _PLAN_CACHE[key]


# --------------------------------------------------------------------------- main entry


class _Stage:
    """One bucket on its way: forward all-to-all, owners' NS, return all-to-all, apply."""

    def __init__(self, plan: _MeshPlan, bucket: _Bucket, pg: dist.ProcessGroup, dtype: torch.dtype, device):
        self.plan, self.b, self.pg, self.dtype, self.device = plan, bucket, pg, dtype, device

    def _a2a(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]):
        recv = send.new_empty(sum(recv_splits))
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.pg, async_op=True)
        item, me = send.element_size(), self.plan.me
        comm_stats.bytes_sent += item * (sum(send_splits) - send_splits[me])
        comm_stats.bytes_recv += item * (sum(recv_splits) - recv_splits[me])
        return recv, work

    def post_forward(self, fill) -> None:
        """Write this rank's update blocks (cast to the NS dtype) into one send buffer; send."""
        send = torch.empty(sum(self.b.send_splits), dtype=self.dtype, device=self.device)
        pos = 0
        for param, key, shape in self.b.send:
            k = shape[0] * shape[1]
            fill(param, key, send[pos : pos + k].view(shape))
            pos += k
        comm_stats.calls += 1
        self.recv, self.work = self._a2a(send, self.b.send_splits, self.b.recv_splits)

    def run_ns(self, ns) -> None:
        """Owners: assemble the matrices from the receive buffer, NS them, send the blocks back."""
        self.work.wait()
        b = self.b
        X = {wide: torch.empty(len(slots), *wide, dtype=self.dtype, device=self.device) for wide, slots in b.batches.items()}

        def slot_view(bufs, slot):
            wide, j, tall = b.slot_pos[slot]
            return bufs[wide][j].mT if tall else bufs[wide][j]

        pos = 0
        for slot, key, shape in b.recv:
            k = shape[0] * shape[1]
            slot_view(X, slot)[key].copy_(self.recv[pos : pos + k].view(shape))
            pos += k
        Y = {wide: ns(x) for wide, x in X.items()}
        send = torch.empty(sum(b.ret_send_splits), dtype=self.dtype, device=self.device)
        pos = 0
        for slot, key, shape in b.ret_send:
            k = shape[0] * shape[1]
            send[pos : pos + k].view(shape).copy_(slot_view(Y, slot)[key])
            pos += k
        self.back, self.work = self._a2a(send, b.ret_send_splits, b.ret_recv_splits)

    def finish(self, apply) -> None:
        """Hand every returned block, straight from the receive buffer, to ``apply``."""
        self.work.wait()
        pos = 0
        for param, key, shape in self.b.ret_recv:
            k = shape[0] * shape[1]
            apply(param, key, self.back[pos : pos + k].view(shape))
            pos += k


@torch.no_grad()
def orthogonalize_(
    params: list[DTensor],
    ns: Callable[[torch.Tensor], torch.Tensor],
    ns_dtype: torch.dtype,
    fill: Callable[[int, Key, torch.Tensor], None],
    apply: Callable[[int, Key, torch.Tensor], None],
    bucket_numel: Optional[int] = None,
) -> None:
    """Newton-Schulz of every full matrix of ``params``, each run once, by one owner rank.

    ``fill(i, key, out)`` writes parameter i's update at ``key`` (an index into i's LOCAL shard)
    into ``out`` (NS dtype); ``ns(X)`` orthogonalises a contiguous wide [B, n, m] buffer it may
    overwrite; ``apply(i, key, O)`` consumes the result for that block. Sharded matrices travel
    in buckets of ~``bucket_numel`` elements, one packed all-to-all per bucket each way, in the
    NS dtype; the next bucket's forward all-to-all is in flight while this bucket's NS runs.
    Matrices whole on their rank (Replicate, 3-D experts split on dim 0) are NS'd locally while
    the first buckets travel. Collective: every rank of every parameter's mesh calls it with
    the same parameter list (checked once per layout; a mismatch is a ValueError on every rank).
    """
    from .muon import orthogonalize_local_

    bucket_numel = bucket_numel or BUCKET_NUMEL
    local_items, by_mesh = [], {}
    for i, p in enumerate(params):
        if p.ndim not in (2, 3):
            raise ValueError(f"Muon parameter {i} has shape {tuple(p.shape)}; valid: 2-D [n, m] or 3-D [E, n, m]")
        if not isinstance(p, DTensor):
            local_items.append((i, p.shape, p.device))
            continue
        if any(pl.is_partial() for pl in p.placements):
            raise ValueError(f"update {i} has Partial placements {p.placements}; reduce gradients first")
        if _is_whole_locally(p):
            local_items.append((i, p.to_local().shape, p.to_local().device))
            continue
        if any(isinstance(pl, _StridedShard) for pl in p.placements):
            raise NotImplementedError(f"update {i}: {p.placements} splits matrices in strides; unsupported")
        if p.device_mesh.get_coordinate() is None:
            continue  # this rank is not part of that parameter's mesh
        by_mesh.setdefault(_mesh_key(p.device_mesh), []).append(i)

    stages = []
    for idx in by_mesh.values():
        mesh = params[idx[0]].device_mesh
        pg = _mesh_group(mesh)
        plan = _get_plan(params, idx, pg, bucket_numel)
        device = params[idx[0]].to_local().device
        stages += [_Stage(plan, b, pg, ns_dtype, device) for b in plan.buckets]

    in_flight = 2
    for st in stages[:in_flight]:
        st.post_forward(fill)
    if local_items:
        orthogonalize_local_([(i, s, d) for i, s, d in local_items if math.prod(s)], ns, ns_dtype, fill, apply)
    for k, st in enumerate(stages):
        st.run_ns(ns)
        if k + in_flight < len(stages):
            stages[k + in_flight].post_forward(fill)
        if k > 0:
            stages[k - 1].finish(apply)
    if stages:
        stages[-1].finish(apply)


@torch.no_grad()
def orthogonalize_dtensors(
    updates: list[DTensor], params: list[DTensor], ns_fn: Callable[[torch.Tensor], torch.Tensor]
) -> list[torch.Tensor]:
    """Newton-Schulz of each full update matrix, returned as this rank's LOCAL shards.

    The copying form of ``orthogonalize_`` (which Muon uses): ``updates`` are DTensors with the
    placements of ``params``; ``out[i]`` has the shape of ``updates[i].to_local()`` and equals
    ``ns_fn(full(updates[i]))`` restricted to this rank's shard, in the updates' dtype.
    """
    if len(updates) != len(params):
        raise ValueError(f"orthogonalize_dtensors got {len(updates)} updates for {len(params)} params")
    for i, (u, p) in enumerate(zip(updates, params)):
        if isinstance(u, DTensor) and tuple(u.placements) != tuple(p.placements):
            raise ValueError(f"update {i} placements {u.placements} differ from the parameter's {p.placements}")
    ups = [u.to_local() if isinstance(u, DTensor) else u for u in updates]
    out = [torch.empty_like(u) for u in ups]
    dtype = ups[0].dtype if ups else torch.float32

    def fill(i, key, dst):
        dst.copy_(ups[i][key])

    def apply(i, key, O):
        out[i][key].copy_(O)

    orthogonalize_(updates, ns_fn, dtype, fill, apply)
    for i, u in enumerate(updates):
        if isinstance(u, DTensor) and u.device_mesh.get_coordinate() is None:
            out[i].copy_(ups[i])  # a rank outside a parameter's mesh holds no shard
    return out


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
