"""Distributed Muon: each matrix orthogonalised once, by one owner rank (owner computes).

Newton-Schulz needs each matrix whole, but a sharded engine leaves every rank pieces of every
matrix. The obvious fix (gather every matrix everywhere, then the same NS on every rank: what
``torch.optim.Muon`` on DTensors and ZeRO-style Muon do) moves ``P (N-1)/N`` bytes to every rank
and repeats all of the NS work ``N`` times. Here each matrix gets ONE owner instead.

The core works on a ``Layout``: the matrices (every expert of a 3-D parameter is one) and, for
every rank of a process group, the rectangles of them it holds (optim.layout). Two adapters
describe their storage to it:

- DTensor shards (FSDP2, HSDP, EP): ``orthogonalize_`` below, the boxes come from the placements;
- ZeRO flat fragments (DeepSpeed stages 1-3): optim.flat, a fragment is up to three rectangles
  per matrix.

Then, the same for both:

1. Plan (deterministic, identical on every rank, checked by a digest, cached): the matrices are
   cut in order into buckets of ~``BUCKET_NUMEL`` elements; in each bucket a matrix held whole
   by one rank is owned by it (no traffic), the others go longest-processing-time first (cost:
   ``optim.newton_schulz.ns_cost``) to the least-loaded rank.
2. Forward all-to-all per bucket: every rank sends each rectangle it holds to its owner, in ONE
   ``all_to_all_single`` over a flat buffer in the NS dtype.
3. Owners assemble their matrices in wide batches by shape (a tall one through a transposed
   view), one ``ns`` call per shape.
4. Return all-to-all: each owner sends every rank the rectangles of the result it holds, which
   ``apply`` consumes straight from the receive buffer.

Two buckets are in flight: bucket k+2's forward all-to-all travels while bucket k's NS runs.
Traffic per rank ~ 2 P/N (P = bytes of the split matrices, N = ranks) and each NS runs once.
Matrices whole on every rank need no plan: all-Replicate DTensors, and 3-D expert weights
sharded only on the expert dim 0 (EP, FSDP's dim-0 shards of experts) are orthogonalised
locally (``orthogonalize_local_``) while the first buckets travel.

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
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from .layout import Box, Key, block, dtensor_box
from .newton_schulz import ApplyFn, FillFn, ns_cost, orthogonalize_local_

__all__ = ["orthogonalize_", "orthogonalize_dtensors", "orthogonalize_layouts_", "make_plan", "Layout", "Piece",
           "comm_stats", "CommStats", "BUCKET_NUMEL"]

NSFn = Callable[[torch.Tensor], torch.Tensor]
BUCKET_NUMEL = 1 << 22  # matrix elements per all-to-all bucket (8 MB in bf16); two buckets are in flight


@dataclass
class CommStats:
    """Bytes this rank sent/received in the owner-computes all-to-alls (self-copies excluded)."""

    bytes_sent: int = 0
    bytes_recv: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.bytes_sent = self.bytes_recv = self.calls = 0


comm_stats = CommStats()


# --------------------------------------------------------------------------- the core


class Piece(NamedTuple):
    """A rectangle of matrix ``unit`` held by a rank; ``sends``: this copy travels (one replica does)."""

    unit: int
    row: int
    col: int
    rows: int
    cols: int
    sends: bool = True


@dataclass
class Layout:
    """What the ranks of one process group hold of a list of matrices: the input of a plan.

    ``shapes``: every matrix (n, m), in the order the buckets take them; ``held[r]``: group rank
    r's pieces; ``where[k]``: (tensor index, key) of ``held[me][k]`` in this rank's storage, the
    arguments ``fill`` and ``apply`` get. ``describe``: what every rank must agree on."""

    ranks: list[int]  # global ranks, in group-rank order
    me: int
    shapes: list[tuple[int, int]]
    held: list[list[Piece]]
    where: list[tuple[int, Key]]
    describe: str = ""


Slot = tuple[int, Key, tuple[int, int]]  # (tensor index or owned slot, key, block shape)


@dataclass
class _Bucket:
    """A slice of the plan that travels in one all-to-all each way.

    ``send``/``ret_recv``: this rank's pieces, destination- resp. source-major; ``recv``/``ret_send``:
    pieces of the owned matrices (slots), source- resp. destination-major. ``batches[(n, m)]``: the
    slots of one NS call (wide shape); ``slot_pos[slot]``: (wide shape, position, tall)."""

    send: list[Slot] = field(default_factory=list)
    recv: list[Slot] = field(default_factory=list)
    ret_send: list[Slot] = field(default_factory=list)
    ret_recv: list[Slot] = field(default_factory=list)
    send_splits: list[int] = field(default_factory=list)
    recv_splits: list[int] = field(default_factory=list)
    ret_send_splits: list[int] = field(default_factory=list)
    ret_recv_splits: list[int] = field(default_factory=list)
    batches: dict = field(default_factory=dict)
    slot_pos: list[tuple[tuple[int, int], int, bool]] = field(default_factory=list)


@dataclass
class Plan:
    """Who owns which matrix and what goes where: layout only, no process group."""

    ranks: list[int]
    me: int
    owners: list[int]
    buckets: list[_Bucket]
    signature: str


def _assign_owners(chunk: list[int], layout: Layout, whole_on: list[Optional[int]], load: list[int],
                   owners: list[int]) -> None:
    """A matrix held whole by one rank stays there; the rest longest processing time first, each
    to the least-loaded rank. Balanced within the bucket (a bucket's results return once its
    slowest owner is done), ties broken by the load carried over from earlier buckets."""
    local = [0] * len(load)
    fixed = [u for u in chunk if whole_on[u] is not None]
    rest = sorted((u for u in chunk if whole_on[u] is None), key=lambda u: -ns_cost(*layout.shapes[u]))
    for u in fixed + rest:
        r = whole_on[u]
        if r is None:
            r = min(range(len(load)), key=lambda q: (local[q], load[q], q))
        owners[u] = r
        local[r] += ns_cost(*layout.shapes[u])
        load[r] += ns_cost(*layout.shapes[u])


def build_plan(layout: Layout, bucket_numel: int) -> Plan:
    """The plan of ``layout`` (a pure function of it: every rank computes the same one)."""
    n, me, shapes = len(layout.ranks), layout.me, layout.shapes
    by_unit: list[list[list[int]]] = [[[] for _ in shapes] for _ in range(n)]  # [rank][unit] -> piece indices
    area = [[0] * n for _ in shapes]
    for r in range(n):
        for k, pc in enumerate(layout.held[r]):
            by_unit[r][pc.unit].append(k)
            if pc.sends:
                area[pc.unit][r] += pc.rows * pc.cols
    whole_on = [next((r for r in range(n) if a[r] == s[0] * s[1]), None) for a, s in zip(area, shapes)]

    chunks, cur, size = [], [], 0  # buckets in matrix order (the order gradients are ready in)
    for u, (rows, cols) in enumerate(shapes):
        cur.append(u)
        size += rows * cols
        if size >= bucket_numel:
            chunks.append(cur)
            cur, size = [], 0
    if cur:
        chunks.append(cur)
    owners, load, buckets = [-1] * len(shapes), [0] * n, []
    for chunk in chunks:
        _assign_owners(chunk, layout, whole_on, load, owners)
        b = _Bucket(send_splits=[0] * n, recv_splits=[0] * n, ret_send_splits=[0] * n, ret_recv_splits=[0] * n)
        mine = [u for u in chunk if owners[u] == me]
        for u in mine:
            wide = (min(shapes[u]), max(shapes[u]))
            b.batches.setdefault(wide, []).append(len(b.slot_pos))
            b.slot_pos.append((wide, len(b.batches[wide]) - 1, shapes[u][0] > shapes[u][1]))
        for r in range(n):
            for u in (u for u in chunk if owners[u] == r):  # what I send r, what r returns me
                for k in by_unit[me][u]:
                    pc, (i, key) = layout.held[me][k], layout.where[k]
                    if pc.sends:
                        b.send.append((i, key, (pc.rows, pc.cols)))
                        b.send_splits[r] += pc.rows * pc.cols
                    b.ret_recv.append((i, key, (pc.rows, pc.cols)))
                    b.ret_recv_splits[r] += pc.rows * pc.cols
            for slot, u in enumerate(mine):  # what r sends me, what I return r
                for k in by_unit[r][u]:
                    pc = layout.held[r][k]
                    piece = (slot, (slice(pc.row, pc.row + pc.rows), slice(pc.col, pc.col + pc.cols)), (pc.rows, pc.cols))
                    if pc.sends:
                        b.recv.append(piece)
                        b.recv_splits[r] += pc.rows * pc.cols
                    b.ret_send.append(piece)
                    b.ret_send_splits[r] += pc.rows * pc.cols
        buckets.append(b)
    signature = repr((layout.ranks, layout.describe, shapes, owners, [len(c) for c in chunks]))
    return Plan(layout.ranks, me, owners, buckets, signature)


def _check_same_plan(plan: Plan, pg: Optional[dist.ProcessGroup], device: torch.device) -> None:
    """Every rank of the group must have planned the same matrices, else the all-to-alls would
    pair up mismatched buffers (a hang or garbage): one collective on a fixed-size digest."""
    if len(plan.ranks) == 1:
        return
    digest = int.from_bytes(hashlib.sha256(plan.signature.encode()).digest()[:7], "little")
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in plan.ranks]
    dist.all_gather(every, mine, group=pg)
    differ = [plan.ranks[r] for r, t in enumerate(every) if int(t.item()) != digest]
    if differ:
        raise ValueError(
            f"optim.distributed: rank {dist.get_rank()} planned other Muon matrices than ranks {differ} "
            f"({len(plan.owners)} split matrices here); every rank must step the same parameters, in the "
            f"same order, with the same shapes and placements"
        )


def make_plan(layout_fn: Callable[[], Layout], pg: Optional[dist.ProcessGroup], device: torch.device,
              bucket_numel: Optional[int] = None) -> Plan:
    """The plan of ``layout_fn()``, checked against the other ranks' (a collective). Plans are
    worth caching: they depend on the layout only."""
    plan = build_plan(layout_fn(), bucket_numel or BUCKET_NUMEL)
    _check_same_plan(plan, pg, device)
    return plan


_PLAN_CACHE: dict = {}  # layouts and sizes only: still valid after a destroy and re-init of the groups


class _Stage:
    """One bucket on its way: forward all-to-all, owners' NS, return all-to-all, apply."""

    def __init__(self, plan: Plan, bucket: _Bucket, pg: Optional[dist.ProcessGroup], dtype: torch.dtype, device):
        self.plan, self.b, self.pg, self.dtype, self.device = plan, bucket, pg, dtype, device

    def _a2a(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]):
        if len(self.plan.ranks) == 1:
            return send, None
        recv = send.new_empty(sum(recv_splits))
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.pg, async_op=True)
        item, me = send.element_size(), self.plan.me
        comm_stats.bytes_sent += item * (sum(send_splits) - send_splits[me])
        comm_stats.bytes_recv += item * (sum(recv_splits) - recv_splits[me])
        return recv, work

    def post_forward(self, fill: FillFn) -> None:
        """Write this rank's update pieces (cast to the NS dtype) into one send buffer; send."""
        send = torch.empty(sum(self.b.send_splits), dtype=self.dtype, device=self.device)
        pos = 0
        for i, key, shape in self.b.send:
            k = shape[0] * shape[1]
            fill(i, key, send[pos : pos + k].view(shape))
            pos += k
        comm_stats.calls += 1
        self.recv, self.work = self._a2a(send, self.b.send_splits, self.b.recv_splits)

    def run_ns(self, ns: NSFn) -> None:
        """Owners: assemble the matrices from the receive buffer, NS them, send the pieces back."""
        if self.work is not None:
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

    def finish(self, apply: ApplyFn) -> None:
        """Hand every returned piece, straight from the receive buffer, to ``apply``."""
        if self.work is not None:
            self.work.wait()
        pos = 0
        for i, key, shape in self.b.ret_recv:
            k = shape[0] * shape[1]
            apply(i, key, self.back[pos : pos + k].view(shape))
            pos += k


@torch.no_grad()
def orthogonalize_layouts_(plans: list[tuple[Plan, Optional[dist.ProcessGroup]]], local_items: list, ns: NSFn,
                           ns_dtype: torch.dtype, fill: FillFn, apply: ApplyFn, device: torch.device) -> None:
    """Run planned exchanges (``plans``: each with its process group) and local NS, overlapped.

    ``local_items``: (index, shape, device) of matrices whole on this rank, NS'd locally while
    the first buckets travel (``orthogonalize_local_``). ``fill(i, key, out)`` writes the update
    at ``key`` of tensor i (``optim.layout.block``) into ``out`` (NS dtype); ``ns(X)``
    orthogonalises a contiguous wide [B, n, m] buffer it may overwrite; ``apply(i, key, O)``
    consumes the result for that piece.
    """
    stages = [_Stage(plan, b, pg, ns_dtype, device) for plan, pg in plans for b in plan.buckets]
    in_flight = 2
    for st in stages[:in_flight]:
        st.post_forward(fill)
    local_items = [(i, s, d) for i, s, d in local_items if math.prod(s)]
    if local_items:
        orthogonalize_local_(local_items, ns, ns_dtype, fill, apply)
    for k, st in enumerate(stages):
        st.run_ns(ns)
        if k + in_flight < len(stages):
            stages[k + in_flight].post_forward(fill)
        if k > 0:
            stages[k - 1].finish(apply)
    if stages:
        stages[-1].finish(apply)


# --------------------------------------------------------------------------- DTensor adapter


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


def _is_whole_locally(p: DTensor) -> bool:
    """True when every local matrix is complete: nothing sharded, or only the batch dim of a 3-D param."""
    dims = {pl.dim % p.ndim for pl in p.placements if isinstance(pl, (Shard, _StridedShard))}
    return not dims or (p.ndim == 3 and dims == {0})


def _dtensor_layout(params: list[DTensor], idx: list[int]) -> Layout:
    """The pieces every rank of the mesh holds of ``params[idx]``: one box per rank and matrix."""
    mesh = params[idx[0]].device_mesh
    ranks = dist.get_process_group_ranks(_mesh_group(mesh))
    me = ranks.index(dist.get_rank())
    coords = {g: [int(c) for c in (mesh.mesh == g).nonzero()[0].tolist()] for g in ranks}
    layout = Layout(ranks, me, [], [[] for _ in ranks], [])
    for i in idx:
        p = params[i]
        rep_dims = [d for d, pl in enumerate(p.placements) if isinstance(pl, Replicate)]
        for r, g in enumerate(ranks):
            box: Box = dtensor_box(p.shape, mesh.shape, coords[g], p.placements)
            sends = all(coords[g][d] == 0 for d in rep_dims)  # one copy travels: the replica at coordinate 0
            for e in [None] if p.ndim == 2 else range(p.shape[0]):
                (off, size), lead = box, ()
                if e is not None:
                    if not off[0] <= e < off[0] + size[0]:
                        continue
                    (off, size), lead = (off[1:], size[1:]), (e - off[0],)
                if 0 in size:
                    continue
                unit = len(layout.shapes) + (0 if e is None else e)
                layout.held[r].append(Piece(unit, off[-2], off[-1], size[-2], size[-1], sends))
                if r == me:
                    o0, o1 = box[0][-2:]
                    key = lead + (slice(off[-2] - o0, off[-2] - o0 + size[-2]), slice(off[-1] - o1, off[-1] - o1 + size[-1]))
                    layout.where.append((i, key))
        layout.shapes += [tuple(p.shape[-2:])] * (1 if p.ndim == 2 else p.shape[0])
    layout.describe = repr((tuple(mesh.mesh.shape), [(tuple(params[i].shape), str(params[i].placements)) for i in idx]))
    return layout


def _dtensor_plan(params: list[DTensor], idx: list[int], pg: dist.ProcessGroup, bucket_numel: Optional[int]) -> Plan:
    # this rank's plan for positions in `params`: the same layouts at other positions need another plan
    bucket_numel = bucket_numel or BUCKET_NUMEL
    key = (dist.get_rank(), tuple(idx), bucket_numel) + tuple(
        (tuple(params[i].shape), tuple(params[i].placements), _mesh_key(params[i].device_mesh)) for i in idx)
    if key not in _PLAN_CACHE:
        _PLAN_CACHE[key] = make_plan(lambda: _dtensor_layout(params, idx), pg, params[idx[0]].to_local().device, bucket_numel)
    return _PLAN_CACHE[key]


@torch.no_grad()
def orthogonalize_(
    params: list[DTensor],
    ns: NSFn,
    ns_dtype: torch.dtype,
    fill: FillFn,
    apply: ApplyFn,
    bucket_numel: Optional[int] = None,
) -> None:
    """Newton-Schulz of every full matrix of ``params`` (DTensors or plain tensors), each run once.

    ``fill(i, key, out)`` writes parameter i's update at ``key`` (an index into i's LOCAL shard)
    into ``out`` (NS dtype); ``ns(X)`` orthogonalises a contiguous wide [B, n, m] buffer it may
    overwrite; ``apply(i, key, O)`` consumes the result for that block. Collective: every rank
    of every parameter's mesh calls it with the same parameter list (checked once per layout; a
    mismatch is a ValueError on every rank).
    """
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

    plans = []
    for idx in by_mesh.values():
        pg = _mesh_group(params[idx[0]].device_mesh)
        plans.append((_dtensor_plan(params, idx, pg, bucket_numel), pg))
    device = params[next(iter(by_mesh.values()))[0]].to_local().device if by_mesh else torch.device("cpu")
    orthogonalize_layouts_(plans, local_items, ns, ns_dtype, fill, apply, device)


@torch.no_grad()
def orthogonalize_dtensors(updates: list[DTensor], params: list[DTensor], ns_fn: NSFn) -> list[torch.Tensor]:
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
        dst.copy_(block(ups[i], key))

    def apply(i, key, O):
        block(out[i], key).copy_(O)

    orthogonalize_(updates, ns_fn, dtype, fill, apply)
    for i, u in enumerate(updates):
        if isinstance(u, DTensor) and u.device_mesh.get_coordinate() is None:
            out[i].copy_(ups[i])  # a rank outside a parameter's mesh holds no shard
    return out
