"""Muon and QK-Clip on flat partitions (ZeRO's layout): whole-matrix maths over 1-D shards.

ZeRO keeps each rank's share of the fp32 master weights, and of the optimizer state, as ONE
flat 1-D tensor per param group, a *partition*: stages 1/2 concatenate the group's parameters
and cut the result into equal pieces, one per rank; stage 3 cuts every parameter into equal
pieces and concatenates the rank's pieces. Either way a rank holds, of each parameter, at most
one contiguous range of its flattened elements, starting and ending anywhere in its rows. A
``Fragment`` says which range and where it sits in the partition. ``optim.Muon`` refuses such
1-D tensors, rightly: Newton-Schulz and QK-Clip need whole matrices and whole rows.

`PartitionedMuonClip` is optim.Muon / optim.MuonClip's step on partitions, with the same maths:

    Muon groups   M <- mu M + G;  U = G + mu M (nesterov) or M      elementwise, on the partition
                  every matrix has ONE owner rank (NS cost balanced, longest first); the ranks
                  send their fragments of U to the owners (one all-to-all), owners orthogonalise
                  their matrices whole (optim.newton_schulz, batched by shape), and send every
                  rank its fragments of the result (a second all-to-all); then on this rank's
                  fragments:  W <- W (1 - lr wd) - lr scale(n, m) O     (optim.muon_scale)
    AdamW groups  optim.Muon's AdamW, elementwise (bias correction, decoupled weight decay)
    QK-Clip       after the update, the q/k rows of the heads over tau are rescaled. The factor of
                  every row comes from optim.qk_clip's own functions, run on a column of ones,
                  so each element is multiplied by exactly the fp32 factor MuonClip would use.

Legend: L elements in one rank's partition (the same on every rank), N ranks.

Traffic per rank and step: what it sends its owners plus what they send back, each about
L (N - 1) / N elements in the NS dtype (~2 P_muon / N in all; an all-gather would receive
(N - 1) L and hold every matrix on every rank). Each NS runs once, on one rank, and no rank holds
more than its own matrices whole. State: optim.Muon's keys (momentum_buffer; step, exp_avg,
exp_avg_sq), each shaped like the partition, created with it.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .muon import _check_group, muon_scale
from .muon_clip import _stats, reduce_max_logits
from .newton_schulz import newton_schulz
from .protocol import QKClipAttention
from .qk_clip import _checked_logits, _where, clip_target_

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
    """One rank's flat partition of a param group and where every rank's fragments sit.

    ``fragments[r]``: rank r's fragments of this partition (ranks of the optimizer's process
    group; every rank's partition has the same length)."""

    tensor: Tensor
    group: int
    fragments: list[list[Fragment]]
    rank: int = 0

    @property
    def local(self) -> list[Fragment]:
        return self.fragments[self.rank]


class PartitionedMuonClip(torch.optim.Optimizer):
    """Muon + AdamW (+ QK-Clip) whose parameters are flat partitions (see the module docstring).

    Build it on the model's whole parameters, grouped by ``optim.muon_param_groups`` (which
    names them); the engine that partitions them (e.g. DeepSpeed's ZeRO) replaces each group's
    ``params`` by its flat partition and then calls ``set_partitions``. Arguments are
    optim.MuonClip's; ``tau=None`` or no attention layers: no QK-Clip.

    QK-Clip runs in two halves around the engine's step, so that a non-finite max logit is
    refused before anything changes: ``prepare_qk_clip()`` (a collective: MAX over
    ``process_group``; raises ``NonFiniteMaxLogit``) decides the row factors, each partition's
    ``step`` applies them to its fragments after its update, ``finish_qk_clip()`` resets the
    layers' records and sets ``last_stats`` (MuonClip's keys).
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        attention_layers: Optional[Sequence[QKClipAttention]] = None,
        tau: Optional[float] = None,
        process_group: Optional[Any] = None,
        lr: float = 2e-4,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        ns_steps: int = 5,
        ns_method: str = "keller",
        ns_dtype: torch.dtype | str = torch.bfloat16,
        ns_backend: str = "auto",
        adjust_lr: str = "match_rms_adamw",
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
    ):
        groups = [dict(g) for g in params]
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        ns_method=ns_method, ns_dtype=ns_dtype, ns_backend=ns_backend, adjust_lr=adjust_lr,
                        adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps, use_muon=True)
        _check_group(defaults, "PartitionedMuonClip defaults")  # optim.Muon's checks (and dtype names)
        if tau is not None and not (isinstance(tau, (int, float)) and 0 < tau < math.inf):
            raise ValueError(f"PartitionedMuonClip: tau={tau!r} must be a finite float > 0 (K2 uses 100)")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._names: dict[int, str] = {}  # id(model parameter) -> name
        for i, group in enumerate(groups):
            names = group.get("param_names")
            if names is None or len(names) != len(group["params"]):
                raise ValueError(f"PartitionedMuonClip: param group {i} needs 'param_names' (optim.muon_param_groups)")
            for name, p in zip(names, group["params"]):
                if group.get("use_muon", True) and p.ndim < 2:
                    raise ValueError(f"PartitionedMuonClip: parameter {name!r} has shape {tuple(p.shape)}; "
                                     "Muon groups take 2-D or 3-D matrices")
                self.shapes[name] = tuple(p.shape)
                self._names[id(p)] = name
        super().__init__(groups, defaults)
        self.attention_layers = list(attention_layers or []) if tau is not None else []
        self.tau = None if tau is None else float(tau)
        self.process_group = process_group
        self.partitions: dict[int, Partition] = {}  # id(partition tensor) -> Partition
        self.skip_next_step = False  # set by a caller that decided to drop this step after backward
        self.bytes_received = 0  # by this rank in the Muon all-to-alls (self-copies excluded), ever
        self._plans: dict[int, _Plan] = {}
        self.last_stats: dict[str, Any] = _stats([], [])
        self._row_scales: dict[str, Tensor] = {}
        self._pending_stats: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------ layout and state
    def name_of(self, p: Tensor) -> str:
        """The name of a model parameter this optimizer was built on."""
        return self._names[id(p)]

    @torch.no_grad()
    def set_partitions(self, partitions: Sequence[Partition]) -> None:
        """Register the flat partitions (they must be what the groups' ``params`` hold now) and
        create their state, zero, so the checkpoint layout never depends on the steps taken."""
        self.partitions = {id(part.tensor): part for part in partitions}
        for part in partitions:
            for frags in part.fragments:
                for f in frags:
                    if f.name not in self.shapes:
                        raise ValueError(f"PartitionedMuonClip: fragment of unknown parameter {f.name!r}")
            state = self.state[part.tensor]
            if state:
                continue
            if self.param_groups[part.group]["use_muon"]:
                state["momentum_buffer"] = torch.zeros_like(part.tensor, dtype=torch.float32)
            else:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(part.tensor, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(part.tensor, dtype=torch.float32)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Update every partition the groups hold now (an engine may pass one group at a time)."""
        if self.skip_next_step:
            return None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                part = self.partitions.get(id(p))
                if part is None:
                    raise RuntimeError("PartitionedMuonClip: a parameter that is not a registered partition; "
                                       "call set_partitions() after the engine has partitioned the groups")
                if group["use_muon"]:
                    self._muon_step(group, p, part)
                else:
                    self._adamw_step(group, p)
                if self._row_scales:
                    self._clip_fragments(p, part)
        return None

    def _muon_step(self, group: dict[str, Any], p: Tensor, part: Partition) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        g_L = p.grad.float()  # type: ignore[union-attr]
        M_L = self.state[p]["momentum_buffer"]
        M_L.mul_(mu).add_(g_L)  # M <- mu M + G
        U_L = g_L.add(M_L, alpha=mu) if group["nesterov"] else M_L
        O_L = self._orthogonalize(U_L, part, group)
        if wd != 0:
            p.mul_(1.0 - lr * wd)
        for f in part.local:
            p[f.flat_start:f.flat_start + f.numel].add_(O_L[f.flat_start:f.flat_start + f.numel],
                                                        alpha=-lr * muon_scale(self.shapes[f.name], group["adjust_lr"]))

    def _orthogonalize(self, U_L: Tensor, part: Partition, group: dict[str, Any]) -> Tensor:
        """NS(U) of every matrix, on this rank's fragments (fp32, laid out like the partition).

        Owner computes: each matrix has one owner (``_plan``); every rank sends its fragments of
        U to their owners in ONE all-to-all, owners run NS batched by shape, and send each rank
        its fragments of the result in a second. Both ways in the NS dtype, which NS casts to
        first and returns: the maths is optim.Muon's to the bit."""
        plan = self._plan(part)
        me, dtype = part.rank, group["ns_dtype"]
        send = torch.cat([U_L[f.flat_start:f.flat_start + f.numel] for q in plan.ranks for f in plan.sent[me][q]]
                         + [U_L.new_empty(0)]).to(dtype)
        recv = self._all_to_all(send, plan.recv_splits[me], plan.send_splits[me], part)
        whole, offset = {}, 0  # this rank's matrices, whole
        for r in plan.ranks:
            for f in plan.sent[r][me]:
                U = whole.setdefault(f.name, recv.new_empty(math.prod(self.shapes[f.name])))
                U[f.param_start:f.param_start + f.numel] = recv[offset:offset + f.numel]
                offset += f.numel
        ortho = self._newton_schulz({name: U.view(self.shapes[name]) for name, U in whole.items()}, group)
        back = torch.cat([ortho[f.name].reshape(-1)[f.param_start:f.param_start + f.numel]
                          for r in plan.ranks for f in plan.sent[r][me]] + [recv.new_empty(0)])
        mine = self._all_to_all(back, plan.send_splits[me], plan.recv_splits[me], part)
        O_L, offset = torch.zeros_like(U_L), 0
        for q in plan.ranks:
            for f in plan.sent[me][q]:
                O_L[f.flat_start:f.flat_start + f.numel] = mine[offset:offset + f.numel]
                offset += f.numel
        return O_L

    def _all_to_all(self, send: Tensor, recv_splits: list[int], send_splits: list[int], part: Partition) -> Tensor:
        if len(part.fragments) == 1:
            return send
        recv = send.new_empty(sum(recv_splits))
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.process_group)
        self.bytes_received += (sum(recv_splits) - recv_splits[part.rank]) * recv.element_size()
        return recv

    def _plan(self, part: Partition) -> "_Plan":
        """Owners of the partition's matrices (longest NS first, each to the least-loaded rank) and
        who sends which fragments to whom; the same on every rank, cached."""
        plan = self._plans.get(id(part.tensor))
        if plan is not None:
            return plan
        ranks = list(range(len(part.fragments)))
        names = list(dict.fromkeys(f.name for frags in part.fragments for f in frags))

        def cost(name: str) -> int:  # one NS iteration's FLOPs up to a constant: s^2 (2l + s) per matrix
            *batch, n, m = self.shapes[name]
            s_, l_ = min(n, m), max(n, m)
            return math.prod(batch) * s_ * s_ * (2 * l_ + s_)

        load, owner = [0] * len(ranks), {}
        for name in sorted(names, key=lambda n: -cost(n)):  # stable: ties keep the layout's order
            q = min(ranks, key=lambda r: load[r])
            owner[name], load[q] = q, load[q] + cost(name)
        sent = [[[f for f in part.fragments[r] if owner[f.name] == q] for q in ranks] for r in ranks]
        plan = _Plan(ranks, sent, [[sum(f.numel for f in sent[r][q]) for q in ranks] for r in ranks],
                     [[sum(f.numel for f in sent[q][r]) for q in ranks] for r in ranks])
        self._plans[id(part.tensor)] = plan
        return plan

    def _newton_schulz(self, whole: dict[str, Tensor], group: dict[str, Any]) -> dict[str, Tensor]:
        """NS of every matrix, one batched call per shape (3-D experts are batches)."""
        by_shape: dict[tuple[int, ...], list[str]] = defaultdict(list)
        for name, U in whole.items():
            by_shape[tuple(U.shape[-2:])].append(name)
        out: dict[str, Tensor] = {}
        for (n, m), names in by_shape.items():
            X_Bnm = torch.cat([whole[name].reshape(-1, n, m) for name in names])
            O_Bnm = newton_schulz(X_Bnm, steps=group["ns_steps"], method=group["ns_method"], dtype=group["ns_dtype"],
                                  backend=group["ns_backend"])
            start = 0
            for name in names:
                count = whole[name].numel() // (n * m)
                out[name] = O_Bnm[start:start + count].reshape(whole[name].shape)
                start += count
        return out

    def _adamw_step(self, group: dict[str, Any], p: Tensor) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["adamw_eps"]
        beta1, beta2 = group["adamw_betas"]
        state = self.state[p]
        g = p.grad.float()  # type: ignore[union-attr]
        state["step"] += 1
        t = state["step"].item()
        if wd != 0:
            p.mul_(1.0 - lr * wd)
        state["exp_avg"].lerp_(g, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = state["exp_avg_sq"].sqrt().div_(math.sqrt(1.0 - beta2**t)).add_(eps)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1.0 - beta1**t))

    # ------------------------------------------------------------------ QK-Clip
    @torch.no_grad()
    def prepare_qk_clip(self) -> None:
        """Reduce and check this step's max logits (a collective); decide the row factors.

        Raises ``NonFiniteMaxLogit`` (naming the layer and head) before anything changes."""
        self._row_scales, self._pending_stats = {}, None
        if not self.attention_layers:
            return
        S_L = reduce_max_logits(self.attention_layers, self.process_group)
        targets = [layer.qk_clip_target() for layer in self.attention_layers]
        targets = [t if t.name else dataclasses.replace(t, name=f"attention_layers[{i}]") for i, t in enumerate(targets)]
        S64_L = [None if S_H is None else _checked_logits(S_H, t.num_heads, self.tau, _where(t.name))
                 for S_H, t in zip(S_L, targets)]
        max_per_layer, clipped_per_layer, scales = [], [], {}
        for S_H, S64_H, target in zip(S_L, S64_L, targets):
            if S_H is None:
                max_per_layer.append(-math.inf)
                clipped_per_layer.append(0)
                continue
            q_name, k_name = self.name_of(target.w_q), self.name_of(target.w_k)
            probe_q = torch.ones(self.shapes[q_name][0], 1)
            probe_k = torch.ones(self.shapes[k_name][0], 1)
            clipped = clip_target_(dataclasses.replace(target, w_q=probe_q, w_k=probe_k), S64_H, self.tau)
            if clipped:
                scales[q_name], scales[k_name] = probe_q[:, 0], probe_k[:, 0]
            max_per_layer.append(float(S_H.max()))
            clipped_per_layer.append(clipped)
        self._row_scales, self._pending_stats = scales, _stats(max_per_layer, clipped_per_layer)

    def _clip_fragments(self, p: Tensor, part: Partition) -> None:
        for f in part.local:
            scale_R = self._row_scales.get(f.name)
            if scale_R is None:
                continue
            cols = math.prod(self.shapes[f.name][1:])
            rows = torch.arange(f.param_start, f.param_start + f.numel) // cols
            frag = p[f.flat_start:f.flat_start + f.numel]
            frag.mul_(scale_R[rows].to(device=frag.device, dtype=torch.promote_types(frag.dtype, torch.float32)))

    def finish_qk_clip(self, applied: bool = True) -> dict[str, Any]:
        """After the engine's step: reset the layers' records; ``last_stats`` = this step's clip
        (``applied=False``: the step was dropped, nothing was clipped). Returns ``last_stats``."""
        stats = self._pending_stats
        self._row_scales, self._pending_stats = {}, None
        for layer in self.attention_layers:
            layer.reset_max_logits()
        if stats is not None and not applied:
            stats = {**stats, "clipped_heads": 0, "clipped_heads_per_layer": [0] * len(stats["clipped_heads_per_layer"])}
        self.last_stats = stats if stats is not None else _stats([], [])
        return self.last_stats


@dataclass
class _Plan:
    """``sent[r][q]``: rank r's fragments of the matrices rank q owns, in the order they travel;
    ``send_splits[r][q]`` / ``recv_splits[r][q]``: elements rank r sends to / receives from q."""

    ranks: list[int]
    sent: list[list[list[Fragment]]]
    send_splits: list[list[int]]
    recv_splits: list[list[int]]
