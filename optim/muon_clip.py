"""MuonClip = Muon + QK-Clip after every step (Kimi K2, arXiv 2507.20534).

Muon lets attention logits grow without bound in large runs (K2 saw max logits
over 1000 and loss spikes). After each optimizer step MuonClip reads every
attention layer's recorded per-head max logit S_h (from this step's forward
passes, i.e. the weights before the update), MAX-reduces it over the
data-parallel ranks (so every replica applies the same rescale), and rescales
the q/k weights of the heads with S_h > tau so that their max logit becomes tau
(see optim.qk_clip). The momentum buffers are left alone.

That is K2's order, and it makes tau a soft cap: the next batch meets the updated
weights on new data. At K2's 67M-token batches the drift is tiny; at a few thousand
tokens per batch a head's max moves ~1.2x from batch to batch with frozen weights,
so maxima a little over tau after the first clip are the algorithm working.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .layout import scale_rows_
from .muon import Muon
from .protocol import QKClipAttention
from .qk_clip import _checked_logits, _where, row_scales

__all__ = ["MuonClip", "reduce_max_logits"]


class MuonClip(Muon):
    """Muon whose step() also applies QK-Clip to ``attention_layers``.

    Args:
        params: as for Muon (e.g. ``optim.muon_param_groups(model)``).
        attention_layers: modules implementing ``optim.protocol.QKClipAttention`` (None or
            empty: plain Muon).
        tau: the max-logit cap (K2: 100).
        process_group: group for the MAX all-reduce of the max logits when
            torch.distributed is initialised (None: the default group). Every rank must
            call step() (it is a collective).
        **muon_kwargs: Muon's arguments (lr, momentum, weight_decay, ns_*, adjust_lr, ...).

    After each step, ``last_stats`` holds ``max_logit`` (float, over layers),
    ``max_logit_per_layer`` (list[float]; -inf for a layer with no recorded forward),
    ``clipped_heads`` (int) and ``clipped_heads_per_layer`` (list[int]).
    """

    def __init__(
        self,
        params: Iterable[Any],
        attention_layers: Optional[Sequence[nn.Module]] = None,
        tau: float = 100.0,
        process_group: Optional[Any] = None,
        **muon_kwargs: Any,
    ):
        super().__init__(params, **muon_kwargs)
        if not (isinstance(tau, (int, float)) and 0 < tau < math.inf):
            raise ValueError(f"MuonClip: tau={tau!r} must be a finite float > 0 (K2 uses 100)")
        layers = list(attention_layers or [])
        for i, layer in enumerate(layers):
            if not isinstance(layer, QKClipAttention):
                raise ValueError(
                    f"MuonClip: attention_layers[{i}] ({type(layer).__name__}) lacks max_logits / qk_clip_target() / "
                    f"reset_max_logits(); see optim.protocol.QKClipAttention"
                )
        self.attention_layers = layers
        self.tau = float(tau)
        self.process_group = process_group
        self.last_stats: dict[str, Any] = _stats([], [])
        self._decision: Optional[_Decision] = None  # phase 1's result, until finish_qk_clip()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One Muon step, then QK-Clip with the max logits this step's forwards recorded.

        All or nothing: unless the caller ran ``prepare_qk_clip()`` already, step() runs it first,
        before any parameter or optimizer state changes, so a NaN/Inf record raises
        ``NonFiniteMaxLogit`` (a ValueError naming the layer and head) and leaves the model and
        the optimizer bit-identical; the records are kept for the caller to inspect or reset.
        Then the update, the decided clip, and ``finish_qk_clip()``.
        """
        loss = None
        if closure is not None:  # the forward must run before the records are read
            with torch.enable_grad():
                loss = closure()
        if self._decision is None:
            self.prepare_qk_clip()
        try:
            super().step()
        except BaseException:  # e.g. a refused non-finite gradient: nothing changed, nothing stays decided
            self._decision = None
            raise
        self._apply_decision(self._decision.rows)
        self.finish_qk_clip()
        return loss

    # ------------------------------------------------------------------ QK-Clip, in two phases
    @torch.no_grad()
    def prepare_qk_clip(self, max_logits: Optional[Sequence[Optional[torch.Tensor]]] = None) -> None:
        """Phase 1, nothing written: MAX-reduce this step's max logits over ``process_group`` (a
        collective), check them (``NonFiniteMaxLogit`` naming the layer and head) and decide every
        clipped row's factor. ``max_logits``: one [H] tensor (or None) per layer instead of the
        layers' records. An engine that must agree on a skip before any rank steps calls it
        first; ``step()`` (or, per partition, optim.flat's) then writes the decided factors."""
        self._decision = None
        self._decision = self._decide(max_logits)

    def finish_qk_clip(self, applied: bool = True) -> dict[str, Any]:
        """Phase 2's end: reset the layers' records and set ``last_stats`` to this step's clip
        (``applied=False``: the step was dropped after prepare, nothing was clipped)."""
        decision, self._decision = self._decision, None
        for layer in self.attention_layers:
            layer.reset_max_logits()
        stats = decision.stats if decision is not None else _stats([], [])
        if not applied:
            stats = {**stats, "clipped_heads": 0, "clipped_heads_per_layer": [0] * len(stats["clipped_heads_per_layer"])}
        self.last_stats = stats
        return stats

    @torch.no_grad()
    def qk_clip_(self, max_logits: Optional[Sequence[Optional[torch.Tensor]]] = None) -> dict[str, Any]:
        """QK-Clip now, outside step(), and return its stats (``last_stats`` is left alone).

        max_logits: None clips with the attention layers' records; or the per-head max
            logits the caller measured, one [H] tensor (or None: no record) per attention
            layer, e.g. from a forward of its own choosing. Either way they are MAX-reduced
            over ``process_group`` first, so every rank applies the same clip (a collective:
            every rank must call it), and checked before any weight changes. The layers'
            records are reset after the clip (they describe the weights before it).
        """
        if not self.attention_layers:
            return _stats([], [])
        decision = self._decide(max_logits)
        self._apply_decision(decision.rows)
        for layer in self.attention_layers:
            layer.reset_max_logits()
        return decision.stats

    def _decide(self, records: Optional[Sequence[Optional[torch.Tensor]]]) -> "_Decision":
        """Reduce, check every layer (all before any clip), and compute the row factors."""
        if records is not None and len(records) != len(self.attention_layers):
            raise ValueError(f"MuonClip: {len(records)} max-logit entries for {len(self.attention_layers)} attention layers")
        if not self.attention_layers:
            return _Decision([], _stats([], []))
        distributed = dist.is_available() and dist.is_initialized()
        if self.process_group is not None and not distributed:
            raise ValueError("MuonClip: process_group was given but torch.distributed is not initialised")
        S_L = reduce_max_logits(self.attention_layers, self.process_group, records)
        targets = [self._target(i) for i in range(len(S_L))]
        S64_L = [None if S_H is None else _checked_logits(S_H, t.num_heads, self.tau, _where(t.name))
                 for S_H, t in zip(S_L, targets)]
        rows, max_per_layer, clipped_per_layer = [], [], []
        for S_H, S64_H, t in zip(S_L, S64_L, targets):
            if S_H is None:
                max_per_layer.append(-math.inf)
                clipped_per_layer.append(0)
                continue
            clipped, q_scale_R, k_scale_R = row_scales(t, S64_H, self.tau, self._full_shape(t.w_q), self._full_shape(t.w_k))
            if clipped:
                rows += [(t.w_q, q_scale_R), (t.w_k, k_scale_R)]
            max_per_layer.append(float(S_H.max()))
            clipped_per_layer.append(clipped)
        return _Decision(rows, _stats(max_per_layer, clipped_per_layer))

    def _full_shape(self, w: torch.Tensor) -> tuple[int, ...]:
        return tuple(w.shape)

    def _apply_decision(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write the decided row factors into the weights, whatever their storage (optim.layout)."""
        for w, scale_R in rows:
            scale_rows_(w, scale_R)

    def _target(self, i: int):
        """Layer i's QKClipTarget, named so that an error can say which layer."""
        target = self.attention_layers[i].qk_clip_target()
        return target if target.name else dataclasses.replace(target, name=f"attention_layers[{i}]")


@dataclass
class _Decision:
    """What phase 1 decided: (weight, per-row factor of the full weight) pairs, and the stats."""

    rows: list[tuple[torch.Tensor, torch.Tensor]]
    stats: dict[str, Any]


@torch.no_grad()
def reduce_max_logits(attention_layers: Sequence[nn.Module], process_group: Optional[Any] = None,
                      records: Optional[Sequence[Optional[torch.Tensor]]] = None) -> list[Optional[torch.Tensor]]:
    """Every layer's per-head max logits, MAX-reduced over ranks in ONE all-reduce, on the CPU.

    records: one [H] tensor (or None) per layer; None reads the layers' ``max_logits``.
    Returns fp32 [H] per layer, or None for a layer that no rank recorded. A NaN on any
    rank comes back as +inf on every rank (MAX may drop a NaN: gloo and NCCL compare with
    >), so a non-finite record never vanishes in the reduction. Without torch.distributed
    initialised it only moves the values to the CPU. Every rank must call it (collective).
    """
    distributed = dist.is_available() and dist.is_initialized()
    records = [layer.max_logits for layer in attention_layers] if records is None else list(records)
    sizes = [layer.qk_clip_target().num_heads for layer in attention_layers]
    for i, (r, n) in enumerate(zip(records, sizes)):
        if r is not None and tuple(r.shape) != (n,):
            raise ValueError(f"QK-Clip [attention_layers[{i}]]: max logits of shape {tuple(r.shape)}, expected ({n},)")
    if not distributed and all(r is None for r in records):
        return [None] * len(records)
    device = next((r.device for r in records if r is not None), None)
    if device is None:  # no record on this rank; still join the collective
        w_q = attention_layers[0].qk_clip_target().w_q
        device = w_q.to_local().device if hasattr(w_q, "to_local") else w_q.device
    flat = torch.cat([
        r.detach().to(device=device, dtype=torch.float32).reshape(-1) if r is not None
        else torch.full((n,), -math.inf, device=device)
        for r, n in zip(records, sizes)
    ])
    if distributed:
        flat = torch.nan_to_num(flat, nan=math.inf, posinf=math.inf, neginf=-math.inf)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=process_group)
    flat = flat.cpu()  # the one host sync of the clip
    return [None if bool((S_H == -math.inf).all()) else S_H for S_H in flat.split(sizes)]


def _stats(max_per_layer: list[float], clipped_per_layer: list[int]) -> dict[str, Any]:
    return {
        "max_logit": max(max_per_layer, default=-math.inf),
        "max_logit_per_layer": max_per_layer,
        "clipped_heads": sum(clipped_per_layer),
        "clipped_heads_per_layer": clipped_per_layer,
    }
