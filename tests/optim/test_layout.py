"""optim.layout and the owner-computes plan, without processes: what a rank holds, who owns what."""

from __future__ import annotations

import math

import pytest
import torch

from optim.distributed import Layout, Piece, build_plan
from optim.layout import Span, block, flat_rectangles


@pytest.mark.parametrize("shape,start,numel", [
    ((5, 7), 0, 35), ((5, 7), 3, 20), ((5, 7), 9, 3), ((5, 7), 7, 14), ((3, 4, 6), 5, 40), ((3, 4, 6), 0, 72),
    ((2, 3, 5), 14, 1),
])
def test_a_flat_range_is_at_most_three_rectangles_per_matrix(shape, start, numel):
    """Every element of the range is in exactly one rectangle, at the offset the rectangle says."""
    full = torch.arange(math.prod(shape)).reshape(shape)
    flat = full.reshape(-1)[start:start + numel]
    seen = torch.zeros(numel, dtype=torch.int64)
    per_matrix: dict[int, int] = {}
    for e, row, col, rows, cols, off in flat_rectangles(shape, start, numel):
        matrix = full.reshape(-1, *shape[-2:])[e]
        assert torch.equal(block(flat, Span(off, rows, cols)), matrix[row:row + rows, col:col + cols])
        seen[off:off + rows * cols] += 1
        per_matrix[e] = per_matrix.get(e, 0) + 1
        assert rows == 1 or (col == 0 and cols == shape[-1])  # partial rows are single rows
    assert torch.equal(seen, torch.ones(numel, dtype=torch.int64))
    assert max(per_matrix.values()) <= 3


def _zero3_layout(shapes: list[tuple[int, ...]], world: int) -> list[Layout]:
    """Every rank's view of ZeRO-3 fragments (each parameter cut into ceil(numel / N) pieces)."""
    units, base = [], {}
    for i, s in enumerate(shapes):
        base[i] = len(units)
        units += [tuple(s[-2:])] * math.prod(s[:-2])
    held: list[list[Piece]] = [[] for _ in range(world)]
    for i, s in enumerate(shapes):
        piece = -(-math.prod(s) // world)
        for r in range(world):
            count = min(piece, math.prod(s) - r * piece)
            for e, row, col, rows, cols, _ in flat_rectangles(s, r * piece, max(count, 0)) if count > 0 else []:
                held[r].append(Piece(base[i] + e, row, col, rows, cols))
    return [Layout(list(range(world)), me, units, held, [(0, ()) for _ in held[me]]) for me in range(world)]


def test_every_expert_has_its_own_owner_and_whole_matrices_stay_home():
    """An expert stack is not one unit: its experts are spread over the ranks (K2: 384 experts a
    layer would otherwise be one rank's NS). A matrix one rank holds whole is owned by that rank."""
    layouts = _zero3_layout([(8, 6, 10), (2, 3)], world=4)  # (2, 3): 6 elements, 2 a rank
    plans = [build_plan(layout, bucket_numel=1 << 22) for layout in layouts]
    assert all(p.owners == plans[0].owners for p in plans)  # the same plan on every rank
    assert sorted(plans[0].owners[:8]) == [0, 0, 1, 1, 2, 2, 3, 3]
    whole = Layout([0, 1], 0, [(4, 4)], [[Piece(0, 0, 0, 4, 4)], []], [(0, ())])
    assert build_plan(whole, 1 << 22).owners == [0] and build_plan(whole, 1 << 22).buckets[0].send_splits == [16, 0]
    whole.held = [[], [Piece(0, 0, 0, 4, 4)]]
    assert build_plan(whole, 1 << 22).owners == [1]


def test_owners_are_balanced_by_ns_cost_per_bucket():
    layout = _zero3_layout([(64, 64), (16, 16), (16, 16), (16, 16), (16, 16)], world=2)[0]
    plan = build_plan(layout, bucket_numel=1 << 22)
    assert plan.owners[0] != plan.owners[1] == plan.owners[2] == plan.owners[3] == plan.owners[4]
    buckets = build_plan(layout, bucket_numel=256)  # one 64x64 bucket, then 16x16 ones in one each
    assert len(buckets.buckets) == 5
