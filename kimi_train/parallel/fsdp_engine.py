"""FSDP2 (with expert parallelism) as a training engine; in one process, the plain model.

One step (``kimi_train.parallel.engine.TrainEngine``):

    for each of A micro-batches:  (loss / A).backward()      # FSDP2 reduces on the last one only
    grad_norm = clip_grad_norm_(params, optim.grad_clip)     # global norm (over the EP and dense meshes)
    skip if a reason was given or grad_norm is not finite
    optimizer.step()    # MuonClip reduces and checks the max logits before it changes anything:
                        # a non-finite one raises NonFiniteMaxLogit with the model and state untouched

Checkpoints: torch's distributed state dicts (``get_model_state_dict``/``get_optimizer_state_dict``),
DTensors that DCP reshards on load.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from optim import MuonClip, NonFiniteMaxLogit

from .dims import ParallelDims
from .fsdp import parallelize_model
from .engine import LossFn, StepOutcome, all_finite, balance_experts, forget_step, read_max_logits
from .grad_norm import clip_grad_norm_
from .optimizer import build_optimizer


class FSDP2State:
    """The checkpoint state of a model (plain or FSDP2/EP-sharded) and its torch optimizer (None:
    the model alone): torch's distributed state dicts, which DCP reshards on load."""

    name = "fsdp2"

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        state = {"model": get_model_state_dict(self.model)}
        if self.optimizer is not None:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state["model"])
        if self.optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])


class FSDP2Engine:
    name = FSDP2State.name

    def __init__(self, cfg: Any, model: nn.Module, dims: ParallelDims, mesh: Any, mixed_precision: bool):
        self.module = parallelize_model(model, dims, mesh, mixed_precision=mixed_precision)
        # The post-step max-logit forward runs the decoder stack without lm_head, so it does not go
        # through the root's forward: FSDP must gather the root unit (embedding, final norm) for it too.
        register_fsdp_forward_method(self.module, "measure_max_logits")  # no-op without FSDP
        if cfg.train.compile:
            self.module.compile()  # in place: parameter names (and checkpoints) stay the same
        self.model = self.module
        self.group = dims.dp_group
        self.description = "FSDP2" if mesh is not None else "one process"
        # Non-finite gradients are skipped here, before optimizer.step(): Muon need not check them again.
        self.optimizer = build_optimizer(cfg, self.model, self.group, check_finite=False)
        self.max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf

    def forward_backward(self, micro_batches: Sequence[torch.Tensor], loss_fn: LossFn) -> torch.Tensor:
        sync = getattr(self.model, "set_requires_gradient_sync", None)  # FSDP2: reduce on the last one only
        loss_sum = None
        for i, mb in enumerate(micro_batches):
            if sync is not None:
                sync(i == len(micro_batches) - 1)
            loss = loss_fn(mb)
            (loss / len(micro_batches)).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        return loss_sum / len(micro_batches)

    def step(self, lr: float, drop: Optional[str] = None) -> StepOutcome:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = float(clip_grad_norm_(self.model.parameters(), self.max_norm))
        if drop is None and not math.isfinite(grad_norm):
            drop = f"non-finite grad_norm={grad_norm}"
        clips = isinstance(self.optimizer, MuonClip)
        if drop is None and clips:
            try:  # QK-Clip's phase 1: reduce + check, before anything changes (a collective)
                self.optimizer.prepare_qk_clip()
            except NonFiniteMaxLogit as e:  # every rank sees it (the MAX reduce keeps it as +inf)
                drop = f"non-finite max logit ({e})"
        if drop is None:
            self.optimizer.step()  # the update, then the clip decided above
        self.optimizer.zero_grad(set_to_none=True)
        if drop is not None:
            forget_step(self.module)
            return StepOutcome(grad_norm, drop)
        clip = dict(self.optimizer.last_stats) if clips else self.read_max_logits()
        return StepOutcome(grad_norm, None, clip)

    def balance_experts(self, rate: float) -> dict[str, Any]:
        return balance_experts(self.module.moe_layers(), rate, self.group)

    def read_max_logits(self) -> dict[str, Any]:
        return read_max_logits(self.module.attention_layers(), self.group)

    def state_dict(self) -> dict[str, Any]:
        return FSDP2State(self.model, self.optimizer).state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        FSDP2State(self.model, self.optimizer).load_state_dict(state)

    def state_is_finite(self) -> bool:
        return all_finite(self.model, self.optimizer)

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every parameter's whole reduced gradient, fp32 (a collective under FSDP2; after the last
        backward of a step, before its step)."""
        return {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().float().clone()
                for name, p in self.model.named_parameters() if p.grad is not None}
