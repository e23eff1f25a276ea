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

Host syncs: one per MoE layer (in the forward; a recomputation under activation checkpointing
replays the collectives' stored outputs and the host copy, parallel.activation_checkpoint), the copy of the 2R split sizes (what I send to / receive from
each rank), because NCCL's all_to_all takes its splits as host integers and the counts are
only known after routing on the device. Everything else (the regrouping permutation, the
local counts) is computed on the device from the device counts, with the one size it needs
(Q, the received slots) taken from the synced splits. Removing this last sync needs fixed-size
buffers (capacity-padded dispatch: up to R times the traffic, or token dropping, which changes
the maths), so it stays.

Overlap: the combine all_to_all is returned un-waited (funcol's AsyncCollectiveTensor waits at
the first use of the result); the MoE computes its shared experts before it reads the routed
output, so on a GPU the shared expert's GEMMs run while the combine is on the wire (on CPU
gloo's worker thread sends while the main thread computes).

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


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, wait: bool = True) -> torch.Tensor:
    """Differentiable all_to_all_single with variable splits along dim 0. wait=False returns the
    collective in flight (an AsyncCollectiveTensor, waited at its first use) where funcol gives one."""
    y = funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
    if wait and isinstance(y, funcol.AsyncCollectiveTensor):
        return funcol.wait_tensor(y)
    return y


def regroup_permutation(counts_recv_RL: torch.Tensor, num_received: int) -> torch.Tensor:
    """perm_Q: slot q of the (expert l, source r) order is received slot perm_Q[q].

    The received blocks arrive in (source r, expert l) order. Block (l, r) starts at src_start
    in the received order and at dst_start in the GEMM order, so perm_Q[q] = q + src_start -
    dst_start over the block's slots. Device ops only; num_received (= counts.sum(), known on
    the host from the split sizes) sizes the output without a sync.
    """
    R = counts_recv_RL.shape[0]
    n_RL = rearrange(counts_recv_RL, "r l -> (r l)")
    src_start_LR = rearrange(n_RL.cumsum(0) - n_RL, "(r l) -> (l r)", r=R)
    n_LR = rearrange(counts_recv_RL, "r l -> (l r)")
    dst_start_LR = n_LR.cumsum(0) - n_LR
    shift_Q = torch.repeat_interleave(src_start_LR - dst_start_LR, n_LR, output_size=num_received)
    return torch.arange(num_received, device=counts_recv_RL.device) + shift_Q


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
            # Functional (out of place), so activation checkpointing can store its output: a
            # recomputed layer must not exchange again (parallel.activation_checkpoint).
            counts_recv_RL = funcol.wait_tensor(funcol.all_to_all_single(counts_send_RL, None, None, self.ep_group))
            # The one host sync (see the module doc): slots I send to / receive from each rank.
            splits_2R = torch.stack([reduce(counts_send_RL, "r l -> r", "sum"),
                                     reduce(counts_recv_RL, "r l -> r", "sum")]).cpu()
            in_splits, out_splits = splits_2R.tolist()
            perm_Q = regroup_permutation(counts_recv_RL, sum(out_splits))
            unperm_Q = torch.empty_like(perm_Q).index_put_((perm_Q,), torch.arange(len(perm_Q), device=perm_Q.device))
            local_counts_L = reduce(counts_recv_RL, "r l -> l", "sum").to(num_tokens_per_expert_E.dtype)

        x_QD = _all_to_all(x_SD, out_splits, in_splits, self.ep_group)[perm_Q]
        # The model's own expert maths, on the local shards (E/R whole experts) of the weights.
        local = types.SimpleNamespace(**{k: v for k, v in vars(self).items() if not k.startswith("_")})
        for name in EXPERT_PARAMS:
            w = getattr(self, name)
            setattr(local, name, w.to_local() if isinstance(w, DTensor) else w)
        local.num_experts = L
        y_QD = GroupedExperts.forward(local, x_QD, local_counts_L, backend)
        # Un-permute by gathering with the inverse permutation: its backward keeps only the indices
        # (an index_copy into a new tensor would keep the whole [Q, D] expert output for backward).
        y_back_QD = y_QD[unperm_Q]
        # In flight on return (module doc): the MoE computes its shared experts before reading it.
        return _all_to_all(y_back_QD, in_splits, out_splits, self.ep_group, wait=False)


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
