"""Muon and QK-Clip on ZeRO's flat partitions: the ZeRO adapter of the owner-computes core.

ZeRO keeps each rank's share of the fp32 master weights and of the optimizer state as ONE flat
1-D *partition* per param group (stages 1/2: the group's parameters concatenated and cut into
equal pieces; stage 3: every parameter cut into equal pieces, a rank's pieces concatenated). A
rank holds, of each parameter, at most one run of its flattened elements, cut anywhere in a row:
a ``Fragment``, up to three rectangles per matrix (optim.layout.flat_rectangles). This module
only describes fragments: optim.distributed plans, exchanges and orthogonalises, and optim.Muon's
update, AdamW and QK-Clip decision run unchanged on fragment views. State: optim.Muon's keys,
shaped like the partition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import Layout, Piece, make_plan, orthogonalize_layouts_
from .layout import Span, block, flat_rectangles, scale_block_
from .muon import muon_update_
from .muon_clip import MuonClip
from .protocol import QKClipAttention

__all__ = ["Fragment", "Partition", "PartitionedMuonClip"]


@dataclass(frozen=True)
class Fragment:
    """Elements [param_start, param_start + numel) of the flattened parameter ``name`` are
    elements [flat_start, flat_start + numel) of a partition."""

    name: str
    param_start: int
    flat_start: int
    numel: int


@dataclass
class Partition:
    """One rank's flat partition of a param group; ``fragments[r]``: rank r's fragments of it
    (ranks of the optimizer's process group; every rank's partition has the same length)."""

    tensor: Tensor
    group: int
    fragments: list[list[Fragment]]
    rank: int = 0

    @property
    def local(self) -> list[Fragment]:
        return self.fragments[self.rank]


class PartitionedMuonClip(MuonClip):
    """optim.MuonClip on flat partitions. Build it on the model's named groups
    (``optim.muon_param_groups``); the engine replaces each group's ``params`` by its partition and
    calls ``set_partitions``. ``tau=None``: no QK-Clip. Per step the engine runs
    ``prepare_qk_clip()`` (a collective; ``NonFiniteMaxLogit`` before anything changes), its step
    (each partition's ``step`` writes the decided row factors after its update;
    ``skip_next_step`` drops it), then ``finish_qk_clip(applied)``."""

    def __init__(self, params: Iterable[dict[str, Any]], attention_layers: Optional[Sequence[QKClipAttention]] = None,
                 tau: Optional[float] = None, process_group: Optional[Any] = None, **muon_kwargs: Any):
        groups = [dict(g) for g in params]
        for i, group in enumerate(groups):
            if len(group.get("param_names") or ()) != len(group["params"]):
                raise ValueError(f"PartitionedMuonClip: param group {i} needs 'param_names' (optim.muon_param_groups)")
        named = [(n, p) for g in groups for n, p in zip(g["param_names"], g["params"])]
        self.shapes = {n: tuple(p.shape) for n, p in named}
        self._names = {id(p): n for n, p in named}  # id(model parameter) -> name
        self.partitions: dict[int, Partition] = {}  # id(partition tensor) -> Partition
        self._plans: dict[int, Any] = {}
        super().__init__(groups, attention_layers if tau is not None else None, 100.0 if tau is None else tau,
                         process_group, check_finite=False, **muon_kwargs)  # the engine checks the grad norm
        self.tau = None if tau is None else float(tau)
        self.skip_next_step = False  # set by a caller that decided to drop this step after backward

    def name_of(self, p: Tensor) -> str:
        """The name of a model parameter this optimizer was built on."""
        return self._names[id(p)]

    def init_state(self) -> None:
        """State for the registered partitions only (none before ``set_partitions``)."""
        for part in self.partitions.values():
            self._init_param_state(part.tensor, self.param_groups[part.group]["use_muon"])

    def set_partitions(self, partitions: Sequence[Partition]) -> None:
        """Register the flat partitions (what the groups' ``params`` hold now) and create their
        state, zero, so the checkpoint layout never depends on the steps taken."""
        unknown = [f.name for part in partitions for frags in part.fragments for f in frags if f.name not in self.shapes]
        if unknown:
            raise ValueError(f"PartitionedMuonClip: fragment of unknown parameter {unknown[0]!r}")
        self.partitions, self._plans = {id(part.tensor): part for part in partitions}, {}
        self.init_state()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Update every partition the groups hold now (an engine may pass one group at a time)."""
        if self.skip_next_step:
            return None
        for group in self.param_groups:
            stepped = [p for p in group["params"] if p.grad is not None]
            if any(id(p) not in self.partitions for p in stepped):
                raise RuntimeError("PartitionedMuonClip: a parameter that is not a registered partition; "
                                   "call set_partitions() after the engine has partitioned the groups")
            self._step_group(group)
            for p in stepped if self._decision is not None else ():  # QK-Clip's decided factors, on the rows held
                scales = {self.name_of(w): scale_R for w, scale_R in self._decision.rows}
                for f, frag in (fv for fv in _fragments(p, self.partitions[id(p)]) if fv[0].name in scales):
                    for _, row, _, rows, cols, off in flat_rectangles(self.shapes[f.name], f.param_start, f.numel):
                        scale_block_(block(frag, Span(off, rows, cols)), row, scales[f.name])
        return None

    def _muon_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for p in params:
            part, pg = self.partitions[id(p)], self.process_group if len(self.partitions[id(p)].fragments) > 1 else None
            if id(p) not in self._plans:
                self._plans[id(p)] = make_plan(lambda: self._layout(part), pg, p.device)

            def orthogonalize(ns, fill, apply, plan=self._plans[id(p)], device=p.device):
                orthogonalize_layouts_([(plan, pg)], [], ns, group["ns_dtype"], fill, apply, device)

            W, G, M = (_fragments(t, part) for t in (p, p.grad.float(), self.state[p]["momentum_buffer"]))
            muon_update_(group, [w for _, w in W], [g for _, g in G], [m for _, m in M],
                         [self.shapes[f.name] for f in part.local], orthogonalize)

    def _layout(self, part: Partition) -> Layout:
        """Every rank's fragments as rectangles of the matrices (every expert one matrix)."""
        first, shapes = {}, []
        for name in dict.fromkeys(f.name for frags in part.fragments for f in frags):
            first[name] = len(shapes)
            shapes += [tuple(self.shapes[name][-2:])] * math.prod(self.shapes[name][:-2])
        N = len(part.fragments)
        ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD) if N > 1 else [part.rank]
        layout = Layout(ranks, part.rank, shapes, [[] for _ in range(N)], [], describe=repr(list(first)))
        for r, frags in enumerate(part.fragments):
            for j, f in enumerate(frags):
                for e, row, col, rows, cols, off in flat_rectangles(self.shapes[f.name], f.param_start, f.numel):
                    layout.held[r].append(Piece(first[f.name] + e, row, col, rows, cols))
                    if r == part.rank:
                        layout.where.append((j, Span(off, rows, cols)))
        return layout

    def _full_shape(self, w: Tensor) -> tuple[int, ...]:
        return self.shapes[self.name_of(w)]  # ZeRO-3's working weights are empty placeholders


def _fragments(t: Tensor, part: Partition) -> list[tuple[Fragment, Tensor]]:
    """This rank's fragments and their views into ``t`` (laid out like the partition)."""
    return [(f, t.narrow(0, f.flat_start, f.numel)) for f in part.local]
