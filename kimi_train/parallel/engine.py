"""The training engine: what the trainer drives, whichever parallelism runs underneath.

    engine = build_engine(cfg, model, dims, mesh, device, accum)   # kimi_train.parallel: picks by parallel.engine
    loss = engine.forward_backward(micro_batches, loss_fn)       # this rank's mean loss; gradients accumulated
    outcome = engine.step(lr, drop=None)                         # -> StepOutcome: skipped (why), grad norm, clip stats
    engine.balance_experts(rate)                                 # the expert-bias update, counts summed over ranks
    losses = engine.evaluate(batches, loss_fn)                   # no grad: each batch's mean loss
    stats = engine.measure_max_logits(micro_batches)             # a no-grad forward's max logits (post-step diagnostic)
    state = engine.state_dict(); dcp.load(state, ...); engine.load_state_dict(state)   # checkpoints

Implementations: ``FSDP2Engine`` (parallel/fsdp_engine.py: FSDP2 with expert parallelism, or a
single process), ``PipelineEngine`` (parallel/pipeline_engine.py: pipeline stages, each FSDP2 with
EP) and ``DeepSpeedEngine`` (parallel/deepspeed_engine.py: ZeRO 1/2/3). The trainer holds one and
never asks which; ``tests/train/test_engine_protocol.py`` drives it with a stub.

``loss_fn`` (the trainer's: ``causal_lm_inputs`` + the model's loss under ``autocast``) is what the
micro-batch engines call; the pipeline engine feeds the same inputs, under the same autocast, to
its schedule, whose last stage computes the same loss.

``step`` decides before anything changes: a reason passed in (``drop``, e.g. a non-finite loss),
a non-finite gradient norm, or a non-finite max logit (MuonClip's reduce + check, which runs
before its update) makes it a skipped step, which changes no weight and no optimizer state,
drops the step's gradients, max-logit records and routed-token counts, and still returns the
statistics it measured.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from kimi_train.model import expert_counts, update_expert_bias
from optim import reduce_max_logits

LossFn = Callable[[torch.Tensor], torch.Tensor]  # one micro-batch [B, T+1] -> its mean loss (a scalar)


def collective_device() -> torch.device:
    """Where a small tensor must be for the default group to reduce it (NCCL: the current GPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def causal_lm_inputs(batch_BT1: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A token window [B, T+1] -> (input_ids [B, T], labels [B, T]) on ``device``: position t predicts t+1."""
    batch_BT1 = batch_BT1.to(device, non_blocking=True)
    return batch_BT1[:, :-1], batch_BT1[:, 1:]


def autocast(device: torch.device, bf16: bool):
    """The forward's precision: bf16 autocast (the master weights stay fp32), or fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def no_clip_stats(num_layers: int = 0) -> dict[str, Any]:
    """MuonClip's ``last_stats`` keys for a step that measured no max logit."""
    return {"max_logit": None, "max_logit_per_layer": [-math.inf] * num_layers, "clipped_heads": 0,
            "clipped_heads_per_layer": [0] * num_layers}


@dataclass
class StepOutcome:
    """What one optimizer step did. ``clip``: MuonClip's ``last_stats`` keys (max_logit,
    max_logit_per_layer, clipped_heads, clipped_heads_per_layer; the max logits of this step's
    forwards, over every data-parallel rank)."""

    grad_norm: float  # global norm of the reduced gradients, before clipping
    skipped: Optional[str] = None  # why the step changed nothing, or None
    clip: dict[str, Any] = field(default_factory=no_clip_stats)


@runtime_checkable
class TrainEngine(Protocol):
    """What ``kimi_train.loop.trainer.Trainer`` needs from a parallelism."""

    model: nn.Module  # what runs the forward (the engine's wrapper of the model)
    module: nn.Module  # the model itself: attention_layers(), moe_layers(), measure_max_logits()
    optimizer: Any  # param_groups and state (the optimizer the config built)
    name: str  # the engine's checkpoint layout ("fsdp2", "deepspeed"): checkpoints of one do not load into another
    description: str  # for the run header, e.g. "FSDP2" or "DeepSpeed ZeRO-3"

    def forward_backward(self, micro_batches: Sequence[torch.Tensor], loss_fn: LossFn) -> torch.Tensor:
        """Accumulate the gradients of these micro-batches (the loss of each divided by their
        count); return this rank's mean loss, detached."""

    def step(self, lr: float, drop: Optional[str] = None) -> StepOutcome:
        """Set ``lr`` in every param group, clip the gradients to optim.grad_clip, update, QK-Clip;
        or skip (``drop``: a reason decided by the caller) and change nothing."""

    def balance_experts(self, rate: float) -> dict[str, Any]:
        """The aux-loss-free expert-bias update with this step's routed-token counts summed over
        the data-parallel ranks; ``kimi_train.model.update_expert_bias``'s statistics."""

    def read_max_logits(self) -> dict[str, Any]:
        """The max logits recorded since the last step, over the data-parallel ranks, then reset."""

    def evaluate(self, batches: Sequence[torch.Tensor], loss_fn: LossFn) -> list[torch.Tensor]:
        """No grad, the model as it is (eval mode is the caller's): each batch's mean loss."""

    def measure_max_logits(self, micro_batches: Sequence[torch.Tensor]) -> dict[str, Any]:
        """A no-grad forward of these batches that records only the max logits (no routed-token
        counts), then ``read_max_logits()``: the trainer's post-step diagnostic."""

    def state_dict(self, checkpoint: Any = None) -> dict[str, Any]:
        """{"model": ..., "optim": ...} for torch.distributed.checkpoint; loading into it and then
        ``load_state_dict`` restores the engine. ``checkpoint``: the path about to be loaded, whose
        layout (an older one) the template may follow."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def state_is_finite(self) -> bool:
        """Every weight, buffer and optimizer state finite, on every rank (a collective)."""


# ---------------------------------------------------------------------------- shared by the engines
@torch.no_grad()
def read_max_logits(attention_layers: list, group: Any = None) -> dict[str, Any]:
    """Per-layer max logits without clipping, then reset: for optimizers without QK-Clip, and for
    measurements outside a step. MuonClip's reduction (MAX over ``group``; a NaN on any rank reads
    as +inf on every rank)."""
    S_L = reduce_max_logits(attention_layers, group)
    for layer in attention_layers:
        layer.reset_max_logits()
    values = [-math.inf if S_H is None else float(S_H.max()) for S_H in S_L]
    return {"max_logit": max(values) if values else None, "max_logit_per_layer": values,
            "clipped_heads": 0, "clipped_heads_per_layer": [0] * len(values)}


@torch.no_grad()
def balance_experts(moe_layers: list, rate: float, group: Any = None) -> dict[str, Any]:
    """``update_expert_bias`` with the routed-token counts summed over ``group`` (every
    data-parallel replica applies the same update)."""
    if not moe_layers:
        return update_expert_bias(moe_layers, rate)
    counts_LE = expert_counts(moe_layers).clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts_LE, op=dist.ReduceOp.SUM, group=group)
    return update_expert_bias(moe_layers, rate, counts_LE)


@torch.no_grad()
def measure_max_logits(module: nn.Module, micro_batches: Sequence[torch.Tensor], device: torch.device,
                       bf16: bool, group: Any = None) -> dict[str, Any]:
    """``module.measure_max_logits`` over the batches' inputs, then ``read_max_logits``."""
    for mb in micro_batches:
        with autocast(device, bf16):
            module.measure_max_logits(causal_lm_inputs(mb, device)[0])
    return read_max_logits(module.attention_layers(), group)


def forget_step(module: nn.Module) -> None:
    """A skipped step's records: the max logits and routed-token counts of its forwards."""
    for layer in module.attention_layers():
        layer.reset_max_logits()
    for moe in module.moe_layers():
        moe.reset_counts()


def all_finite(*objects: Any) -> bool:
    """True when every floating tensor of ``objects`` (models: parameters and buffers; optimizers:
    their state; tensors) is finite on every rank (a collective when torch.distributed is initialised)."""
    ok = True
    for obj in objects:
        if torch.is_tensor(obj):
            tensors = [obj]
        elif isinstance(obj, nn.Module):
            tensors = list(obj.parameters()) + list(obj.buffers())
        else:
            tensors = [v for s in obj.state.values() for v in s.values() if torch.is_tensor(v)]
        for t in tensors:
            t = t.to_local() if hasattr(t, "to_local") else t
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                ok = False
                break
    if dist.is_initialized():
        flag = torch.tensor([1.0 if ok else 0.0], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item() == 1.0)
    return ok
