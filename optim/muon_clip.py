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
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .muon import Muon
from .protocol import QKClipAttention
from .qk_clip import _checked_logits, _where, clip_target_

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

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One Muon step, then QK-Clip with the max logits this step's forwards recorded.

        All or nothing: the records are reduced and checked (finite, one value per head)
        before any parameter or optimizer state changes, so a NaN/Inf record raises
        ``NonFiniteMaxLogit`` (a ValueError naming the layer and head) and leaves the
        model and the optimizer bit-identical; the records are kept for the caller to
        inspect or reset.
        """
        loss = None
        if closure is not None:  # the forward must run before the records are read
            with torch.enable_grad():
                loss = closure()
        S_L = self._reduced(None)
        S64_L = self._checked(S_L)
        super().step()
        self.last_stats = self._clip(S_L, S64_L)
        return loss

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
        if max_logits is not None and len(max_logits) != len(self.attention_layers):
            raise ValueError(f"MuonClip.qk_clip_: {len(max_logits)} max-logit entries for "
                             f"{len(self.attention_layers)} attention layers")
        S_L = self._reduced(max_logits)
        return self._clip(S_L, self._checked(S_L))

    def _reduced(self, records: Optional[Sequence[Optional[torch.Tensor]]]) -> list[Optional[torch.Tensor]]:
        distributed = dist.is_available() and dist.is_initialized()
        if self.process_group is not None and not distributed:
            raise ValueError("MuonClip: process_group was given but torch.distributed is not initialised")
        return reduce_max_logits(self.attention_layers, self.process_group, records)

    def _clip(self, S_L: list[Optional[torch.Tensor]], S64_L: list[Optional[torch.Tensor]]) -> dict[str, Any]:
        """Clip every layer with its reduced, checked max logits (None: no record), then reset."""
        max_per_layer: list[float] = []
        clipped_per_layer: list[int] = []
        for i, (S_H, S64_H) in enumerate(zip(S_L, S64_L)):
            if S_H is None:
                max_per_layer.append(-math.inf)
                clipped_per_layer.append(0)
                continue
            max_per_layer.append(float(S_H.max()))
            clipped_per_layer.append(clip_target_(self._target(i), S64_H, self.tau))
        for layer in self.attention_layers:
            layer.reset_max_logits()
        return _stats(max_per_layer, clipped_per_layer)

    def _checked(self, S_L: list[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        """Every layer's max logits as fp64 [H] (None: no record), refused (NonFiniteMaxLogit,
        naming the layer) if any is NaN/Inf or of the wrong shape: all layers before any clip."""
        out = []
        for i, S_H in enumerate(S_L):
            target = None if S_H is None else self._target(i)
            out.append(None if S_H is None else _checked_logits(S_H, target.num_heads, self.tau, _where(target.name)))
        return out

    def _target(self, i: int):
        """Layer i's QKClipTarget, named so that an error can say which layer."""
        target = self.attention_layers[i].qk_clip_target()
        return target if target.name else dataclasses.replace(target, name=f"attention_layers[{i}]")


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
