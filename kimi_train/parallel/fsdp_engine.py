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
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from optim import MuonClip, NonFiniteMaxLogit

from .dims import ParallelDims
from .fsdp import parallelize_model
from .engine import (LossFn, StepOutcome, all_finite, balance_experts, forget_step, measure_max_logits,
                     read_max_logits)
from .grad_norm import clip_grad_norm_
from .optimizer import build_optimizer


class FSDP2State:
    """The checkpoint state of a model (plain, FSDP2/EP-sharded, or a pipeline rank's part) and its
    torch optimizer (None: the model alone): torch's distributed state dicts, which DCP reshards
    on load. The optimizer's is flattened (``state.<param name>.<key>``, ``param_groups.<param
    name>.<key>``): every entry is keyed by a parameter name, so a rank that holds some of the
    parameters (a pipeline stage) saves and loads exactly its own, under any layout.

    A group's ``param_names`` (optim.muon_param_groups names every parameter) would be repeated
    under every parameter of the group, quadratic in the parameter count: it is left out and
    restored from the optimizer on load.

    Checkpoints written before pipeline parallelism keep the optimizer's param groups as a list
    (``optim.param_groups.0.lr``); ``state_dict(checkpoint=path)`` gives that layout's template
    for such a checkpoint, so they still load (into a model that holds every parameter)."""

    name = "fsdp2"

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
        self.model, self.optimizer = model, optimizer

    @staticmethod
    def has_listed_param_groups(checkpoint: Path) -> bool:
        """Whether ``checkpoint`` keeps the optimizer's param groups as a list (the layout before PP)."""
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
        return "optim.param_groups.0.lr" in keys

    def state_dict(self, checkpoint: Optional[Path] = None) -> dict[str, Any]:
        state = {"model": get_model_state_dict(self.model)}
        if self.optimizer is not None:
            flat = checkpoint is None or not self.has_listed_param_groups(checkpoint)
            options = StateDictOptions(flatten_optimizer_state_dict=flat)
            optim = get_optimizer_state_dict(self.model, self.optimizer, options=options)
            state["optim"] = {k: v for k, v in optim.items() if not _is_flat_names(k)} if flat else optim
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state["model"])
        if self.optimizer is not None:
            optim = state["optim"]
            flat = "param_groups" not in optim  # the template said which layout was read
            if flat:
                optim = {**optim, **self._flat_names(optim)}
            options = StateDictOptions(flatten_optimizer_state_dict=flat)
            set_optimizer_state_dict(self.model, self.optimizer, optim, options=options)

    def _flat_names(self, optim: dict[str, Any]) -> dict[str, Any]:
        """The ``param_groups.<name>.param_names`` entries left out of the checkpoint, from the optimizer."""
        out = {}
        for group in self.optimizer.param_groups:
            names = group.get("param_names")
            for name in names or ():
                if f"param_groups.{name}.lr" in optim:
                    out[f"param_groups.{name}.param_names"] = names
        return out


def _is_flat_names(key: str) -> bool:
    return key.startswith("param_groups.") and key.endswith(".param_names")


class FSDP2Engine:
    name = FSDP2State.name

    def __init__(self, cfg: Any, model: nn.Module, dims: ParallelDims, mesh: Any, device: torch.device,
                 mixed_precision: bool):
        self.module = parallelize_model(model, dims, mesh, mixed_precision=mixed_precision)
        # The post-step max-logit forward runs the decoder stack without lm_head, so it does not go
        # through the root's forward: FSDP must gather the root unit (embedding, final norm) for it too.
        register_fsdp_forward_method(self.module, "measure_max_logits")  # no-op without FSDP
        if cfg.train.compile:
            self.module.compile()  # in place: parameter names (and checkpoints) stay the same
        self.model = self.module
        self.group, self.device, self.bf16 = dims.dp_group, device, mixed_precision
        self.description = "FSDP2" if mesh is not None else "one process"
        self._build_optimizer(cfg)

    def _build_optimizer(self, cfg: Any) -> None:
        # Non-finite gradients are skipped here, before optimizer.step(): Muon need not check them again.
        self.optimizer = build_optimizer(cfg, self.module, self.group, check_finite=False)
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

    stages_group: Any = None  # ranks holding the model's other pipeline stages (PipelineEngine)

    def step(self, lr: float, drop: Optional[str] = None) -> StepOutcome:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = float(clip_grad_norm_(self.model.parameters(), self.max_norm, group=self.stages_group))
        if drop is None and not math.isfinite(grad_norm):
            drop = f"non-finite grad_norm={grad_norm}"
        clips, prepared = isinstance(self.optimizer, MuonClip), False
        if drop is None and clips:
            try:  # QK-Clip's phase 1: reduce + check, before anything changes (a collective)
                self.optimizer.prepare_qk_clip()
                prepared = True
            except NonFiniteMaxLogit as e:  # every rank sees it (the MAX reduce keeps it as +inf)
                drop = f"non-finite max logit ({e})"
            drop = self._agree(drop)
        if drop is None:
            self.optimizer.step()  # the update, then the clip decided above
        self.optimizer.zero_grad(set_to_none=True)
        if drop is not None:
            if prepared:  # a decision another pipeline stage overruled
                self.optimizer.finish_qk_clip(applied=False)
            forget_step(self.module)
            return StepOutcome(grad_norm, drop)
        clip = self._by_layer(dict(self.optimizer.last_stats)) if clips else self.read_max_logits()
        return StepOutcome(grad_norm, None, clip)

    def _agree(self, reason: Optional[str]) -> Optional[str]:
        """The reason to drop this step on every rank: the same everywhere already (one model)."""
        return reason

    def _by_layer(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Per-layer statistics of this rank's layers -> the model's: the same without pipeline stages."""
        return stats

    def balance_experts(self, rate: float) -> dict[str, Any]:
        return balance_experts(self.module.moe_layers(), rate, self.group)

    def read_max_logits(self) -> dict[str, Any]:
        return read_max_logits(self.module.attention_layers(), self.group)

    @torch.no_grad()
    def evaluate(self, batches: Sequence[torch.Tensor], loss_fn: LossFn) -> list[torch.Tensor]:
        return [loss_fn(batch) for batch in batches]

    def measure_max_logits(self, micro_batches: Sequence[torch.Tensor]) -> dict[str, Any]:
        return measure_max_logits(self.module, micro_batches, self.device, self.bf16, self.group)

    def state_dict(self, checkpoint: Optional[Path] = None) -> dict[str, Any]:
        return FSDP2State(self.module, self.optimizer).state_dict(checkpoint)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        FSDP2State(self.module, self.optimizer).load_state_dict(state)

    def state_is_finite(self) -> bool:
        return all_finite(self.module, self.optimizer)

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every parameter's (this rank's stages') whole reduced gradient, fp32 (a collective under
        FSDP2; after the last backward of a step, before its step)."""
        return {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().float().clone()
                for name, p in self.module.named_parameters() if p.grad is not None}
