"""Pipeline parallelism as a training engine: this rank's stages, each FSDP2 (with EP) over its
data-parallel group, driven by a torch.distributed.pipelining schedule.

One step (``kimi_train.parallel.engine.TrainEngine``):

    schedule.step(input_ids, labels)     # A micro-batches (the step's accumulation micro-batches) through
                                         # 1F1B or Interleaved1F1B; the last stage returns each one's mean
                                         # loss; torch divides the gradients by A once (scale_grads), so
                                         # no loss is divided by A here (that would scale twice)
    loss = mean of the A losses, summed over the pp group (only the last stage has them)
    grad_norm = clip_grad_norm_(params, group=pp)   # squared norms summed over the stages
    drop = the caller's reason, or a non-finite grad_norm (the same on every rank), or a
           non-finite max logit on ANY stage: each stage's MuonClip reduces and checks its own layers
           over its dp group (prepare_qk_clip), then one flag reduced over the pp group, so every
           stage agrees before any stage steps
    optimizer.step()                     # the update and the decided clip, on every stage, or on none

The step itself is FSDP2Engine's: this engine supplies the pp group for the grad norm, the
agreement (``_agree``) and the statistics by model layer (``_by_layer``).

Statistics (max logit and clipped heads per layer, expert load per layer) are each stage's, reduced
over its dp group, then combined over the pp group in one [layers] tensor each, indexed by model
layer as a run without PP logs them. Evaluation and the post-step max-logit forward run the schedule forward-only.

Checkpoints are ``FSDP2State``'s (``name`` "fsdp2"): each rank's model keeps the whole model's
parameter names and the optimizer state is keyed by them, so DCP reshards a checkpoint between
pipeline layouts and to and from runs without PP.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from kimi_train.config import pp_stages_per_rank
from kimi_train.errors import UserError
from kimi_train.model.loss import IGNORE_INDEX

from .dims import ParallelDims
from .engine import LossFn, autocast, balance_experts, causal_lm_inputs, read_max_logits
from .fsdp import parallelize_model
from .fsdp_engine import FSDP2Engine, FSDP2State
from .pipeline import layer_index, split_model, stage_layers

def _stage_loss(loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The schedule's loss_fn: the last stage already returned its micro-batch's mean loss."""
    return loss


class PipelineEngine(FSDP2Engine):

    def __init__(self, cfg: Any, model: nn.Module, dims: ParallelDims, mesh: Any, device: torch.device,
                 accum: int, mixed_precision: bool):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

        p = cfg.parallel
        per_rank = pp_stages_per_rank(p)
        num_stages = p.pp * per_rank
        self.layout = stage_layers(cfg.model.num_hidden_layers, num_stages, p.pp_layout)
        mine = [dims.pp_rank + i * p.pp for i in range(per_rank)]  # the interleaved schedules' loop order
        self.stages = split_model(model, self.layout, mine)
        self.module = parallelize_model(model, dims, mesh, mixed_precision=mixed_precision, roots=self.stages)
        self.model = self.module  # train() / eval() reach every stage's modules
        self.num_layers = cfg.model.num_hidden_layers
        self.moe_layers = [i for i in range(self.num_layers) if cfg.model.is_moe_layer(i)]  # the whole model's
        self.index = layer_index(self.module)
        self.group, self.stages_group, self.device, self.bf16 = dims.dp_group, dims.pp_group, device, mixed_precision
        self.micro_batch_size, self.accum = cfg.train.micro_batch_size, accum
        self.has_first = any(s.is_first for s in self.stages)
        self.has_last = any(s.is_last for s in self.stages)
        self.description = (f"pipeline {p.pp_schedule}, {num_stages} stages of {[len(s) for s in self.layout]} "
                            f"layers, FSDP2")
        self._build_optimizer(cfg)
        # Static shapes: without them torch infers them with a forward of uninitialised tensors on
        # the first step, whose max logits and routed-token counts would count as the step's.
        B, T, D = cfg.train.micro_batch_size, cfg.train.seq_len, cfg.model.hidden_size
        hidden = torch.empty(B, T, D, dtype=torch.bfloat16 if mixed_precision else torch.float32, device="meta",
                             requires_grad=True)
        ids, loss = torch.empty(B, T, dtype=torch.long, device="meta"), torch.empty((), device="meta", requires_grad=True)
        stages = [PipelineStage(stage, s, num_stages, device, group=self.stages_group,
                                input_args=ids if stage.is_first else hidden, output_args=loss if stage.is_last else hidden)
                  for stage, s in zip(self.stages, mine)]
        if p.pp_schedule == "1F1B":
            self.schedule = Schedule1F1B(stages[0], accum, loss_fn=_stage_loss)
        else:
            self.schedule = ScheduleInterleaved1F1B(stages, accum, loss_fn=_stage_loss)

    # ------------------------------------------------------------------ the pipeline
    def _run(self, x: torch.Tensor, y: torch.Tensor, train: bool) -> list[torch.Tensor]:
        """input ids and labels [A * B, T] through the schedule (A micro-batches of B rows); the last
        stage's per-micro-batch losses (an empty list on the other ranks)."""
        losses: list[torch.Tensor] = []
        args = (x,) if self.has_first else ()
        # labels: a keyword every stage of this rank receives; the last stage's loss reads it. The
        # schedule also wants a target to split for its loss_fn.
        kwargs = dict(target=y, losses=losses, labels=y) if self.has_last else {}
        with autocast(self.device, self.bf16):
            if train:
                self.schedule.step(*args, return_outputs=False, **kwargs)
            else:
                self.schedule.eval(*args, return_outputs=False, **kwargs)
        return losses

    def _from_last_stage(self, values: list[torch.Tensor], n: int) -> torch.Tensor:
        """The last stage's ``n`` values on every rank (a sum over the pp group, zeros elsewhere)."""
        out = torch.stack([v.detach().float() for v in values]) if values else torch.zeros(n, device=self.device)
        out = out.to(self.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.stages_group)
        return out

    def forward_backward(self, micro_batches: Sequence[torch.Tensor], loss_fn: LossFn) -> torch.Tensor:
        """The schedule computes each micro-batch's loss in its last stage (``loss_fn`` is not called)."""
        if len(micro_batches) != self.accum:
            raise ValueError(f"PipelineEngine: {len(micro_batches)} micro-batches; the schedule was built for {self.accum}")
        x, y = causal_lm_inputs(torch.cat(list(micro_batches)), self.device)
        return self._from_last_stage(self._run(x, y, train=True), self.accum).mean()

    @torch.no_grad()
    def evaluate(self, batches: Sequence[torch.Tensor], loss_fn: LossFn) -> list[torch.Tensor]:
        """Each batch's mean loss: batches padded to the micro-batch size with rows whose labels are
        ignored, run A at a time (the last group filled with copies of its last batch, whose
        losses are dropped)."""
        xs, ys = [], []
        for batch in batches:
            pad = self.micro_batch_size - batch.shape[0]
            if pad < 0:
                raise ValueError(f"PipelineEngine: an evaluation batch of {batch.shape[0]} rows; at most "
                                 f"train.micro_batch_size={self.micro_batch_size}")
            x, y = causal_lm_inputs(batch, self.device)
            xs.append(torch.cat([x, x.new_zeros(pad, x.shape[1])]))
            ys.append(torch.cat([y, y.new_full((pad, y.shape[1]), IGNORE_INDEX)]))
        losses: list[torch.Tensor] = []
        for start in range(0, len(xs), self.accum):
            real = len(xs[start:start + self.accum])
            fill = [start + real - 1] * (self.accum - real)
            idx = list(range(start, start + real)) + fill
            group = self._run(torch.cat([xs[i] for i in idx]), torch.cat([ys[i] for i in idx]), train=False)
            losses += list(self._from_last_stage(group, self.accum)[:real])
        return losses

    def measure_max_logits(self, micro_batches: Sequence[torch.Tensor]) -> dict[str, Any]:
        x, y = causal_lm_inputs(torch.cat(list(micro_batches)), self.device)
        with torch.no_grad(), self.module.measuring_max_logits():
            self._run(x, y, train=False)
        return self.read_max_logits()

    # ------------------------------------------------------------------ the step
    def _agree(self, reason: Optional[str]) -> Optional[str]:
        """Every stage's reason to drop this step (None: none), the same on every rank: one flag
        reduced over the pp group, and the reasons themselves only when some stage has one."""
        flag = torch.tensor([0 if reason is None else 1], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.stages_group)
        if not flag.item():
            return None
        reasons: list[Optional[str]] = [None] * dist.get_world_size(self.stages_group)
        dist.all_gather_object(reasons, reason, group=self.stages_group)
        return next(r for r in reasons if r is not None)

    # ------------------------------------------------------------------ statistics, by model layer
    def _gather(self, values: list, indices: list[int], fill: float, op: Any) -> list[float]:
        """Per-layer values of this rank's layers (model ``indices``) -> every layer's, in model
        order: one [L] tensor reduced over the pp group (each layer is on one stage; ``fill`` is the
        identity of ``op``)."""
        every = torch.full((self.num_layers,), fill, dtype=torch.float64, device=self.device)
        if indices:
            every[indices] = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(every, op=op, group=self.stages_group)
        return every.tolist()

    def _by_layer(self, stats: dict[str, Any]) -> dict[str, Any]:
        """MuonClip's ``last_stats`` (or ``read_max_logits``') of this rank's layers -> the model's."""
        attention = self.index["attention"]
        max_per_layer = self._gather(stats["max_logit_per_layer"], attention, -math.inf, dist.ReduceOp.MAX)
        clipped = [int(c) for c in self._gather(stats["clipped_heads_per_layer"], attention, 0.0, dist.ReduceOp.SUM)]
        return {"max_logit": max(max_per_layer), "max_logit_per_layer": max_per_layer, "clipped_heads": sum(clipped),
                "clipped_heads_per_layer": clipped}

    def balance_experts(self, rate: float) -> dict[str, Any]:
        mine = balance_experts(self.module.moe_layers(), rate, self.group)
        if not self.moe_layers:
            return mine
        every = self._gather(mine["imbalance_per_layer"], self.index["moe"], 0.0, dist.ReduceOp.SUM)
        per_layer = [every[i] for i in self.moe_layers]
        return {"imbalance_per_layer": per_layer, "max_imbalance": max(per_layer),
                "mean_imbalance": sum(per_layer) / len(per_layer)}

    def read_max_logits(self) -> dict[str, Any]:
        return self._by_layer(read_max_logits(self.module.attention_layers(), self.group))

    # ------------------------------------------------------------------ state
    def state_dict(self, checkpoint: Optional[Path] = None) -> dict[str, Any]:
        if checkpoint is not None and FSDP2State.has_listed_param_groups(checkpoint):
            raise UserError(f"checkpoint {checkpoint} has the optimizer layout from before pipeline "
                            "parallelism, which a pipeline stage cannot load: resume it once with "
                            "parallel.pp=1 (its next checkpoint loads under any parallel.pp)")
        return FSDP2State(self.module, self.optimizer).state_dict()
