"""Expert parallelism applied from outside the model: routed experts Shard(0) over the "ep" mesh dim.

Legend: S routed slots on this rank (tokens x top-k, sorted by global expert), D hidden size,
E global experts, L = E / ep local experts, R = ep ranks, Q slots received from all EP ranks.

The model's MoE sorts its slots by expert and calls ``experts(x_SD, num_tokens_per_expert_E)``.
``apply_ep`` turns each GroupedExperts into an EP version whose forward is:

1. exchange counts: all_to_all of num_tokens_per_expert viewed [R, L] -> counts_RL (how many
   slots every EP rank sends to each of my local experts);
2. dispatch: all_to_all (autograd, variable splits) of the slots: rank r's block for me holds
   its slots for my experts, sorted by expert;
3. permute the received slots from (source rank, expert) order to (expert, source rank) order
   and run the model's own grouped GEMM on the L local experts (local shards of the weights);
4. un-permute and combine: the reverse all_to_all returns every slot's output to its token.

The weights are DTensors [E, out, in] with Shard(0) on "ep": each rank holds whole experts, so
Muon orthogonalises them locally (optim.distributed) with no communication. Gradients of a
local expert sum over the slots of every EP rank: FSDP must divide by the full data-parallel
size, not by its own (efsdp) mesh size (see parallel.fsdp).
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from einops import rearrange, reduce
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from kimi_train.model.moe import GroupedExperts

EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable all_to_all_single with variable splits along dim 0."""
    y = funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
    return funcol.wait_tensor(y) if isinstance(y, funcol.AsyncCollectiveTensor) else y


class ExpertParallelGroupedExperts(GroupedExperts):
    """GroupedExperts whose forward dispatches slots to the ranks owning their experts (see module doc)."""

    ep_group: dist.ProcessGroup
    ep_size: int

    def forward(self, x_SD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        R = self.ep_size
        L = self.num_experts // R
        with torch.no_grad():
            # Global expert e = r * L + l lives on rank r as its local expert l.
            counts_send_RL = rearrange(num_tokens_per_expert_E.to(torch.int64), "(r l) -> r l", r=R)
            counts_recv_RL = torch.empty_like(counts_send_RL)
            dist.all_to_all_single(counts_recv_RL, counts_send_RL, group=self.ep_group)
            # Index maths on the host (one sync: the splits are needed there anyway).
            send_RL, recv_RL = counts_send_RL.cpu(), counts_recv_RL.cpu()
            in_splits = reduce(send_RL, "r l -> r", "sum").tolist()  # slots I send to rank r
            out_splits = reduce(recv_RL, "r l -> r", "sum").tolist()  # slots rank r sends me
            # The received blocks come in (source r, expert l) order; the GEMM wants (expert l, source r).
            n_RL = rearrange(recv_RL, "r l -> (r l)")
            src_start_LR = rearrange(n_RL.cumsum(0) - n_RL, "(r l) -> (l r)", r=R)  # where each block arrived
            n_LR = rearrange(recv_RL, "r l -> (l r)")
            dst_start_LR = n_LR.cumsum(0) - n_LR  # where the GEMM order puts it
            # Slot q of the GEMM order is received slot perm_Q[q].
            perm_Q = torch.arange(int(n_LR.sum())) + torch.repeat_interleave(src_start_LR - dst_start_LR, n_LR)
            perm_Q = perm_Q.to(x_SD.device)
            local_counts_L = reduce(recv_RL, "r l -> l", "sum").to(num_tokens_per_expert_E.device)

        x_QD = _all_to_all(x_SD, out_splits, in_splits, self.ep_group)[perm_Q]
        # The model's own expert maths, on the local shards (E/R whole experts) of the weights.
        local = types.SimpleNamespace(**{k: v for k, v in vars(self).items() if not k.startswith("_")})
        for name in EXPERT_PARAMS:
            w = getattr(self, name)
            setattr(local, name, w.to_local() if isinstance(w, DTensor) else w)
        local.num_experts = L
        y_QD = GroupedExperts.forward(local, x_QD, local_counts_L, backend)
        y_back_QD = torch.empty_like(y_QD)
        y_back_QD = y_back_QD.index_copy(0, perm_Q, y_QD)  # differentiable un-permute
        return _all_to_all(y_back_QD, in_splits, out_splits, self.ep_group)


def apply_ep(model: nn.Module, ep_mesh) -> nn.Module:
    """Shard every GroupedExperts of ``model`` over ``ep_mesh`` (1-D) and make its forward EP.

    Every rank must hold the same full weights (same seed), as FSDP also assumes: each rank
    keeps its chunk of E/ep experts, as a DTensor with Shard(0) on ``ep_mesh``.
    """
    R, r = ep_mesh.size(), ep_mesh.get_local_rank()
    for module in model.modules():
        if not isinstance(module, GroupedExperts) or isinstance(module, ExpertParallelGroupedExperts):
            continue
        if module.num_experts % R:
            raise ValueError(f"parallel.ep={R} must divide the number of routed experts {module.num_experts}")
        for name in EXPERT_PARAMS:
            full = getattr(module, name)
            local = full.detach().chunk(R, dim=0)[r].clone()
            dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())
            setattr(module, name, nn.Parameter(dt, requires_grad=full.requires_grad))
        module.__class__ = _ep_class(type(module))
        module.ep_group = ep_mesh.get_group()
        module.ep_size = R
    return model


def _ep_class(cls: type) -> type:
    if issubclass(cls, ExpertParallelGroupedExperts):
        return cls
    if cls is GroupedExperts:
        return ExpertParallelGroupedExperts
    return type(f"ExpertParallel{cls.__name__}", (ExpertParallelGroupedExperts, cls), {})
