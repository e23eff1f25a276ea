"""FSDP2 (``fully_shard``) applied from outside the model, one unit per decoder layer plus the root.

Order (torchtitan's): expert parallelism first (routed experts become DTensors on "ep"), then
FSDP: routed experts of each MoE layer as their own unit over the expert-FSDP mesh, then each
decoder layer over the dense mesh, then the root (embedding, final norm, lm_head). Under pipeline
parallelism the roots are the rank's pipeline stages (kimi_train/parallel/pipeline.py), each
holding its share of the embedding, final norm and lm_head: torch's schedule drives a stage's
gradient reduction through its root.

Gradient scaling under EP (the trap): FSDP divides a reduced gradient by the size of its own
mesh. Dense parameters: every rank computed d(local mean loss)/dW, FSDP averages over all
dp_replicate * dp_shard ranks: right. A local routed expert's gradient, however, already SUMS
over the slots of all ``ep`` ranks (the combine all-to-all's backward brings them home), and the
expert FSDP mesh is only dp_replicate * efsdp ranks: the default average would be ``ep`` times too
large. So the expert units divide by the full data-parallel size instead.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from kimi_train.model.moe import GroupedExperts, MoE

from .dims import ParallelDims
from .expert_parallel import apply_ep


def parallelize_model(model: nn.Module, dims: ParallelDims, mesh, mixed_precision: bool = False,
                      roots: Optional[Sequence[nn.Module]] = None) -> nn.Module:
    """Apply expert parallelism (when dims.ep > 1) then FSDP2; identity for a single process."""
    if mesh is None:
        return model
    if dims.ep > 1:
        apply_ep(model, mesh["ep"])
    return apply_fsdp(model, dims, mesh, mixed_precision=mixed_precision, roots=roots)


def apply_fsdp(model: nn.Module, dims: ParallelDims, mesh, mixed_precision: bool = False,
               roots: Optional[Sequence[nn.Module]] = None) -> nn.Module:
    """Shard ``model`` (a KimiForCausalLM) with FSDP2 on ``mesh`` (from ``dims.build_mesh``).

    mixed_precision: bf16 parameters in forward/backward, fp32 gradient reduction; the sharded
    master weights (what the optimizer owns and QK-Clip rescales) stay fp32. ``roots``: the
    modules whose forward the engine calls (default: the model), each the root unit of the
    parameters it holds outside the decoder layers.
    """
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    # The router scores in fp32 (SPEC): under bf16 mixed precision its weight gets a unit of its
    # own that all-gathers fp32, else the layer's unit would hand it a bf16-rounded weight.
    router_mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    dense_mesh = dims.dense_mesh(mesh)
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoE) and mixed_precision:
            fully_shard(layer.mlp.gate, mesh=dense_mesh, mp_policy=router_mp)
        if isinstance(layer.mlp, MoE) and dims.ep > 1:
            experts: GroupedExperts = layer.mlp.experts
            fully_shard(experts, mesh=dims.expert_fsdp_mesh(mesh), mp_policy=mp)
            experts.set_gradient_divide_factor(float(dims.dp_replicate * dims.dp_shard))
            # Only NCCL has PREMUL_SUM; elsewhere sum, then scale. Not when efsdp == 1:
            # its 1-rank "reduce-scatter" (torch 2.13) would then divide twice (local copy + after).
            if dist.get_backend() != "nccl" and dims.efsdp > 1:
                experts.set_force_sum_reduction_for_comms(True)
        fully_shard(layer, mesh=dense_mesh, mp_policy=mp)
    for root in roots if roots is not None else [model]:
        fully_shard(root, mesh=dense_mesh, mp_policy=mp)
    return model
