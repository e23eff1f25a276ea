"""MuonClip = Muon + QK-Clip after every step (Kimi K2, arXiv 2507.20534).

Muon lets attention logits grow without bound in large runs (K2 saw max logits
over 1000 and loss spikes). After each optimizer step MuonClip reads every
attention layer's recorded per-head max logit S_h, MAX-reduces it over the
data-parallel ranks (so every replica applies the same rescale), and rescales
the q/k weights of the heads with S_h > tau so that their max logit becomes tau
(see optim.qk_clip). The momentum buffers are left alone.
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
from .qk_clip import NonFiniteMaxLogit, _checked_logits, _where, clip_target_

__all__ = ["MuonClip", "union_clipped"]


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
    ``clipped_heads`` (int), ``clipped_heads_per_layer`` (list[int]) and
    ``clipped_heads_mask_per_layer`` (list[list[bool]], the query heads over tau); with
    ``step(remeasure=...)`` also ``max_logit_remeasured`` (+ ``_per_layer``).
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
    def step(self, closure: Optional[Callable[[], Any]] = None, *,
             remeasure: Optional[Callable[[], Any]] = None, remeasure_passes: int = 1) -> Any:
        """One Muon step, then QK-Clip.

        remeasure: K2 clips with the max logits of this step's forward, i.e. of the weights
            *before* the update, so a clipped head lands on tau times whatever the update
            added to it. Given a callable, MuonClip instead drops those records after the
            update, calls ``remeasure()``, which must run a forward (typically the step's own
            batch under no_grad, with the attention layers in training mode so they record),
            and clips with the max logits it recorded. The clipped heads of the first
            attention layer then give exactly tau on that batch. A later layer's input also
            changes with the clips of the layers before it, so its heads can land a little
            off tau; ``remeasure_passes`` > 1 re-runs remeasure() and clips again, so after
            pass k the first k layers are at most tau, with their heads that were still over
            it exactly on tau (two passes left a 2-layer toy model at tau to 1e-6, from 1.05
            tau after one). Each pass costs one forward (under step's no_grad) and one MAX
            all-reduce, besides the one that reads the step's forward. ``last_stats`` still
            reports the step's forward (``max_logit``, ...) and adds ``max_logit_remeasured``
            (+ ``_per_layer``), the updated weights before any clip; ``clipped_heads`` counts
            the heads over tau in any pass, each head once. A non-finite max logit in the step's
            forward or in a pass is an error, as for plain step(). Without attention layers
            remeasure is not called. Every rank must pass the same arguments (collectives).
        """
        if isinstance(remeasure_passes, bool) or not (isinstance(remeasure_passes, int) and remeasure_passes >= 1):
            raise ValueError(f"MuonClip.step: remeasure_passes={remeasure_passes!r} must be an int >= 1")
        loss = super().step(closure)
        if remeasure is None or not self.attention_layers:
            self.last_stats = self.qk_clip_()
            return loss
        seen_L = self._reduced_max_logits()
        self._checked(seen_L)  # the same refusal as a clip with these values
        passes = self.measure_and_clip_(remeasure, remeasure_passes, require_record=any(S is not None for S in seen_L))
        seen = _stats([-math.inf if S_H is None else float(S_H.max()) for S_H in seen_L],
                      passes["clipped_heads_mask_per_layer"])
        self.last_stats = {
            **seen,
            "max_logit_remeasured": passes["max_logit"],
            "max_logit_remeasured_per_layer": passes["max_logit_per_layer"],
        }
        return loss

    @torch.no_grad()
    def measure_and_clip_(self, measure: Callable[[], Any], passes: int = 1, *,
                          require_record: bool = True) -> dict[str, Any]:
        """QK-Clip with max logits measured now, outside step(): drop the layers' records, call
        ``measure()`` (a forward with the attention layers in training mode, typically no_grad),
        clip with what it recorded, ``passes`` times. Returns the stats of the first pass before
        its clip (``max_logit``, ``max_logit_per_layer``) and the heads over tau in any pass
        (``clipped_heads``, ``clipped_heads_per_layer``, ``clipped_heads_mask_per_layer``; each
        head once). It leaves ``last_stats`` alone.

        step(remeasure=f) calls it after the update. Called before a forward with ``measure``
        running that forward's own inputs, it bounds that forward's max logits by tau (the
        trainer's optim.qk_clip.lookahead). Pass k leaves the first k attention layers at most
        tau on those inputs; later layers can land a little off it, since the clips before them
        change their inputs. Every rank must call it with the same ``passes`` and run as many
        collective forwards in ``measure()``. require_record: a pass that records nothing is an
        error (False: allowed, e.g. a step whose own forward recorded nothing either). A NaN/Inf
        max logit raises ``NonFiniteMaxLogit`` before that pass clips any layer; the clips of
        earlier passes stay, and the exception's ``stats`` holds them (None when the first pass raised).
        """
        if isinstance(passes, bool) or not (isinstance(passes, int) and passes >= 1):
            raise ValueError(f"MuonClip: passes={passes!r} must be an int >= 1")
        if not self.attention_layers:
            return _stats([], [])
        for layer in self.attention_layers:
            layer.reset_max_logits()
        over_L = [[False] * layer.qk_clip_target().num_heads for layer in self.attention_layers]  # in any pass
        for i in range(passes):
            measure()
            S_L = self._reduced_max_logits()
            if require_record and all(S_H is None for S_H in S_L):
                raise RuntimeError(
                    "MuonClip: the re-measure recorded no max logits; remeasure() (step) or measure() "
                    "(measure_and_clip_) must run a forward with the attention layers in training mode "
                    "(they record only then)"
                )
            try:
                pass_stats = self._clip(S_L)
            except NonFiniteMaxLogit as e:  # this pass clipped nothing; the earlier ones stand
                for layer in self.attention_layers:
                    layer.reset_max_logits()
                e.stats = _stats(first["max_logit_per_layer"], over_L) if i > 0 else None
                raise
            if i == 0:
                first = pass_stats
            over_L = union_clipped(over_L, pass_stats["clipped_heads_mask_per_layer"])
        return _stats(first["max_logit_per_layer"], over_L)

    @torch.no_grad()
    def qk_clip_(self) -> dict[str, Any]:
        """Reduce, clip and reset every attention layer's max logits; returns the stats."""
        if not self.attention_layers:
            return _stats([], [])
        return self._clip(self._reduced_max_logits())

    def _clip(self, S_L: list[Optional[torch.Tensor]]) -> dict[str, Any]:
        """Clip every layer with its reduced max logits (CPU fp32 [H], or None: no record), reset."""
        S64_L = self._checked(S_L)  # every layer checked before any is clipped: all or nothing
        max_per_layer: list[float] = []
        over_L: list[list[bool]] = []
        for i, (S_H, S64_H) in enumerate(zip(S_L, S64_L)):
            target = self._target(i)
            if S_H is None:
                max_per_layer.append(-math.inf)
                over_L.append([False] * target.num_heads)
                continue
            max_per_layer.append(float(S_H.max()))
            clip_target_(target, S_H, self.tau)
            over_L.append((S64_H > self.tau).tolist())  # fp64, as the clip functions compare
        for layer in self.attention_layers:
            layer.reset_max_logits()
        return _stats(max_per_layer, over_L)

    def _checked(self, S_L: list[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        """Every layer's max logits as fp64 [H] (None: no record), refused (NonFiniteMaxLogit,
        naming the layer) if any is NaN/Inf or of the wrong shape."""
        out = []
        for i, S_H in enumerate(S_L):
            target = None if S_H is None else self._target(i)
            out.append(None if S_H is None else
                       _checked_logits(S_H, target.num_heads, self.tau, _where(target.name)))
        return out

    def _target(self, i: int):
        """Layer i's QKClipTarget, named so that an error can say which layer."""
        target = self.attention_layers[i].qk_clip_target()
        return target if target.name else dataclasses.replace(target, name=f"attention_layers[{i}]")

    def _reduced_max_logits(self) -> list[Optional[torch.Tensor]]:
        """Every layer's max logits, MAX-reduced over ranks in ONE all-reduce, on the CPU.

        A layer with no record contributes -inf, so ranks agree on the flat layout even if
        only some of them ran a forward through it.
        """
        distributed = dist.is_available() and dist.is_initialized()
        if self.process_group is not None and not distributed:
            raise ValueError("MuonClip: process_group was given but torch.distributed is not initialised")
        records = [layer.max_logits for layer in self.attention_layers]
        if not distributed and all(r is None for r in records):
            return [None] * len(records)
        sizes = [layer.qk_clip_target().num_heads for layer in self.attention_layers]
        device = next((r.device for r in records if r is not None), None)
        if device is None:  # no record on this rank; still join the collective
            device = _local_device(self.attention_layers[0].qk_clip_target().w_q)
        flat = torch.cat(
            [
                r.detach().to(device=device, dtype=torch.float32).reshape(-1)
                if r is not None
                else torch.full((n,), -math.inf, device=device)
                for r, n in zip(records, sizes)
            ]
        )
        if distributed:
            # MAX may drop a NaN (gloo and NCCL compare with >): send it as +inf, which survives,
            # so every rank sees the non-finite record and refuses the clip together
            flat = torch.nan_to_num(flat, nan=math.inf, posinf=math.inf, neginf=-math.inf)
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.process_group)
        flat = flat.cpu()  # the one host sync of the clip
        out: list[Optional[torch.Tensor]] = []
        for S_H in flat.split(sizes):
            out.append(None if bool((S_H == -math.inf).all()) else S_H)
        return out


def _local_device(w: torch.Tensor) -> torch.device:
    return w.to_local().device if hasattr(w, "to_local") else w.device


def union_clipped(a_L: list[list[bool]], b_L: list[list[bool]]) -> list[list[bool]]:
    """The heads clipped in either of two ``clipped_heads_mask_per_layer`` (e.g. a
    measure_and_clip_ before a forward and the step() after it), each head once."""
    if len(a_L) != len(b_L) or any(len(a) != len(b) for a, b in zip(a_L, b_L)):
        raise ValueError(f"union_clipped: masks of {[len(a) for a in a_L]} and {[len(b) for b in b_L]} heads")
    return [[x or y for x, y in zip(a, b)] for a, b in zip(a_L, b_L)]


def _stats(max_per_layer: list[float], clipped_mask_per_layer: list[list[bool]]) -> dict[str, Any]:
    clipped_per_layer = [sum(mask) for mask in clipped_mask_per_layer]
    return {
        "max_logit": max(max_per_layer, default=-math.inf),
        "max_logit_per_layer": max_per_layer,
        "clipped_heads": sum(clipped_per_layer),
        "clipped_heads_per_layer": clipped_per_layer,
        "clipped_heads_mask_per_layer": clipped_mask_per_layer,
    }
