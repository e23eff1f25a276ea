"""Where the pieces of each matrix sit in this rank's local storage.

Newton-Schulz needs whole matrices and QK-Clip whole rows, but a sharded engine leaves each rank
rectangles of them. Two storages, one description:

- a DTensor shard (FSDP2, HSDP, EP): the local tensor is one box of the full tensor, found from
  the placements (``dtensor_box``); a matrix's piece is indexed by a tuple of slices;
- a flat fragment (DeepSpeed ZeRO): elements [start, start + numel) of the flattened parameter,
  contiguous in a 1-D partition. Cut anywhere in a row, it is up to three rectangles per matrix:
  a partial first row, whole rows, a partial last row (``flat_rectangles``); each is contiguous
  in the partition and indexed by a ``Span``.

``block(t, key)`` turns either key into a 2-D view of the local storage, so the owner-computes
core (optim.distributed) and the row scaling of QK-Clip (``scale_rows_``) never ask which.

This module imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

try:  # keep optim importable on torch builds without torch.distributed
    from torch.distributed.tensor import DTensor, Replicate, Shard
except Exception:  # pragma: no cover
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

__all__ = ["Box", "Span", "Key", "block", "dtensor_box", "flat_rectangles", "scale_rows_"]

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (global offsets, sizes) of a local shard


@dataclass(frozen=True)
class Span:
    """A rows x cols rectangle stored contiguously, row-major, at ``start`` of a 1-D tensor."""

    start: int
    rows: int
    cols: int


Key = Union[tuple, Span]  # tuple: an index into a local tensor; Span: a run of a 1-D tensor


def block(t: Tensor, key: Key) -> Tensor:
    """The piece ``key`` of local storage ``t`` as a view (2-D for a Span)."""
    if isinstance(key, Span):
        return t.narrow(0, key.start, key.rows * key.cols).view(key.rows, key.cols)
    return t[key]


def dtensor_box(shape: Sequence[int], mesh_shape: Sequence[int], coord: Sequence[int], placements) -> Box:
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


def flat_rectangles(shape: Sequence[int], start: int, numel: int) -> list[tuple[int, int, int, int, int, int]]:
    """Elements [start, start + numel) of a row-major [..., n, m] tensor as rectangles.

    Returns (matrix, row, col, rows, cols, offset) per rectangle: ``matrix`` indexes the
    flattened leading dims (the expert of [E, n, m]), ``offset`` is where the rectangle starts
    in the range. Per matrix at most three: a partial first row, whole rows, a partial last row.
    """
    n, m = shape[-2], shape[-1]
    nm, end, out = n * m, start + numel, []
    for e in range(start // nm, -(-end // nm)):
        lo, hi = max(start, e * nm) - e * nm, min(end, (e + 1) * nm) - e * nm
        while lo < hi:
            row, col = divmod(lo, m)
            if col or hi - lo < m:  # a partial row
                cols = min(m - col, hi - lo)
                out.append((e, row, col, 1, cols, e * nm + lo - start))
                lo += cols
            else:  # whole rows
                rows = (hi - lo) // m
                out.append((e, row, 0, rows, m, e * nm + lo - start))
                lo += rows * m
    return out


@torch.no_grad()
def scale_rows_(w: Tensor, row_scale: Tensor) -> Tensor:
    """In place ``w[r, ...] *= row_scale[r]`` for a weight that may be a DTensor.

    ``row_scale`` covers every row of the FULL weight (shape [w.shape[0]]); each rank scales
    the rows of its shard (a head's rows may span two shards: each side scales its part).
    The product is taken at fp32 or better (rounding gamma^0.5 to bf16 would miss tau); a row
    whose factor is exactly 1.0 stays bit-identical.
    """
    if row_scale.shape != (w.shape[0],):
        raise ValueError(f"row_scale has shape {tuple(row_scale.shape)}; expected ({w.shape[0]},) for weight {tuple(w.shape)}")
    if DTensor is None or not isinstance(w, DTensor):
        scale_block_(w, 0, row_scale)
        return w
    coord = w.device_mesh.get_coordinate()
    if coord is None:
        return w
    (off, _) = dtensor_box(w.shape, w.device_mesh.shape, coord, w.placements)
    scale_block_(w.to_local(), off[0], row_scale)
    return w


def scale_block_(view: Tensor, row: int, row_scale: Tensor) -> None:
    """Rows [row, row + len(view)) of a weight, held as ``view``, times their factors."""
    scale = row_scale.to(device=view.device, dtype=torch.promote_types(view.dtype, torch.float32))
    view.mul_(scale[row : row + view.shape[0]].view(-1, *([1] * (view.ndim - 1))))
