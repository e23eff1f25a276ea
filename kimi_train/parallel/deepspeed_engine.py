"""DeepSpeed ZeRO (stages 1, 2, 3) as the other engine, applied from outside the model like apply_fsdp.

    engine = DeepSpeedEngine(cfg, model, dims, device, accum, bf16)   # parallel.engine=deepspeed (build_engine)

DeepSpeed owns what ZeRO is about: the gradient reduction, the partitioned fp32 master weights and
optimizer state, gradient clipping, the copy of the masters into the working weights (and, at
stage 3, the partitioned working weights themselves). The maths is ours: DeepSpeed is handed
``optim.flat.PartitionedMuonClip`` as a client optimizer, and after ``deepspeed.initialize`` it is
told where every parameter's fragments sit in ZeRO's flat partitions (``_zero12_partitions``,
``_zero3_partitions``), so Newton-Schulz and QK-Clip see whole matrices and whole rows, and the
result matches FSDP2 + optim.MuonClip step by step (tests/distributed/test_deepspeed_engine.py).

Settings that would change that maths are set here and checked after initialisation (``_guard``),
loudly: no DeepSpeed optimizer or scheduler (our lr schedule writes the groups' lr), DeepSpeed's own
Muon path off (it clips the orthogonalised update, not the gradient, and has no QK-Clip), gradient
clipping = optim.grad_clip on the reduced gradient, no fp16 loss scaling, fp32 master weights.
Precision: train.dtype=bf16 runs the forward under autocast, as on FSDP2; DeepSpeed keeps fp32
working weights (its bf16 mode would also cast the fp32 router and its bias buffer).

The micro-batch protocol is DeepSpeed's: ``gradient_accumulation_steps`` = the trainer's A, every
micro-batch is ``engine.backward(loss)`` (DeepSpeed divides by A itself) and every micro-batch but
the last is followed by ``engine.step()`` (a no-op off the accumulation boundary); the last one's
step is ``DeepSpeedEngine.step``, which also runs QK-Clip around it.

Expert parallelism is not supported on this engine (parallel.ep > 1 is a config error).
Checkpoints: ``state_dict`` / ``load_state_dict``, laid out by deepspeed_checkpoint.py (see docs/distributed.md).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from kimi_train.errors import UserError
from optim import NonFiniteMaxLogit
from optim.flat import Fragment, Partition, PartitionedMuonClip

from .deepspeed_checkpoint import checkpoint_state, load_checkpoint_state
from .dims import ParallelDims
from .engine import (LossFn, StepOutcome, all_finite, balance_experts, forget_step, measure_max_logits,
                     read_max_logits)
from .optimizer import build_optimizer

ZERO_STAGES = (1, 2, 3)


def deepspeed_config(cfg: Any, dp_size: int, accum: int) -> dict[str, Any]:
    """The DeepSpeed config of a TrainConfig (nothing else is read from a DeepSpeed JSON)."""
    p, ds = cfg.parallel, cfg.parallel.deepspeed
    zero: dict[str, Any] = {"stage": p.zero_stage, "reduce_bucket_size": ds.reduce_bucket_size,
                            "allgather_bucket_size": ds.allgather_bucket_size, "overlap_comm": False,
                            "contiguous_gradients": True}
    if p.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=ds.allgather_bucket_size)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.train.micro_batch_size * accum * dp_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # ours: PartitionedMuonClip
        "zero_force_ds_cpu_optimizer": False,  # offload with a client optimizer, stepping on the CPU
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def _initialize(model: nn.Module, cfg: Any, dp_size: int, accum: int, device: torch.device):
    """``deepspeed.initialize`` with our optimizer as the client, checked, its partitions registered;
    returns (DeepSpeed's engine, the client optimizer). Every rank calls it."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes for one and warns
    try:
        import deepspeed
    except ImportError as e:
        raise UserError(f"parallel.engine='deepspeed' needs DeepSpeed, which cannot be imported ({e}); "
                        "pip install 'kimi-train[deepspeed]', or use parallel.engine=fsdp2") from None
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if not dist.is_initialized():  # one process (no torchrun): DeepSpeed still wants a process group
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    client = build_optimizer(cfg, model, partitioned=True)
    config = deepspeed_config(cfg, dp_size, accum)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config, dist_init_required=False)
    zero = engine.optimizer
    _guard(engine, zero, client, cfg)
    client.process_group = zero.dp_process_group
    stage = cfg.parallel.zero_stage
    client.set_partitions(_zero3_partitions(zero, client) if stage == 3 else _zero12_partitions(zero, client))
    return engine, client


def _guard(engine: Any, zero: Any, client: PartitionedMuonClip, cfg: Any) -> None:
    """Refuse, loudly, a DeepSpeed setup whose maths would not be ours (see the module docstring)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    problems = []
    stage = cfg.parallel.zero_stage
    want = DeepSpeedZeroOptimizer_Stage3 if stage == 3 else DeepSpeedZeroOptimizer
    if not isinstance(zero, want) or zero.optimizer is not client:
        problems.append(f"DeepSpeed did not wrap our optimizer in its ZeRO-{stage} optimizer ({type(zero).__name__})")
    if engine.zero_optimization_stage() != stage:
        problems.append(f"ZeRO stage {engine.zero_optimization_stage()} instead of {stage}")
    if engine.lr_scheduler is not None:
        problems.append("a DeepSpeed lr scheduler (the trainer's schedule sets the lr)")
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        problems.append("fp16/bf16 mode (fp32 master and working weights expected; bf16 is autocast)")
    if float(engine.gradient_clipping()) != float(cfg.optim.grad_clip):
        problems.append(f"gradient_clipping={engine.gradient_clipping()} instead of optim.grad_clip={cfg.optim.grad_clip}")
    if any(hasattr(p, "use_muon") for p in engine.module.parameters()) or getattr(zero, "use_muon", False):
        problems.append("DeepSpeed's own Muon path (it clips the orthogonalised update and has no QK-Clip)")
    if float(getattr(zero, "loss_scale", 1.0)) != 1.0:
        problems.append(f"loss scale {zero.loss_scale}")
    if problems:
        raise RuntimeError("DeepSpeed engine set up with maths that are not kimi-train's: " + "; ".join(problems))


def _gather_fragments(local: list[Fragment], group: Any) -> list[list[Fragment]]:
    if not dist.is_initialized():
        return [local]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, local, group=group)
    return out


def _zero12_partitions(zero: Any, client: PartitionedMuonClip) -> list[Partition]:
    """Stages 1/2: group i's partition is ``single_partition_of_fp32_groups[i]``; each working
    parameter inside it has a ``_hp_mapping`` (its range, and where it sits in the partition)."""
    partitions = []
    for i, params in enumerate(zero.bit16_groups):
        group = zero.real_dp_process_group[i]
        local = []
        for p in params:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None or mapping.lp_fragment_address.numel == 0:
                continue
            local.append(Fragment(client.name_of(p), mapping.lp_fragment_address.start,
                                  mapping.get_hp_fragment_address().start, mapping.lp_fragment_address.numel))
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        partitions.append(Partition(zero.single_partition_of_fp32_groups[i], i, _gather_fragments(local, group), rank))
    return partitions


def _zero3_partitions(zero: Any, client: PartitionedMuonClip) -> list[Partition]:
    """Stage 3: every parameter is cut into ``partition_numel()`` pieces (the last padded), piece r
    on rank r; sub-group s's partition ``fp32_partitioned_groups_flat[s]`` concatenates this
    rank's pieces at the offsets of ``grad_position``."""
    group = zero.dp_process_group
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    partitions = []
    for s, params in enumerate(zero.fp16_groups):
        fragments: list[list[Fragment]] = [[] for _ in range(world)]
        for p in params:
            _, flat_start, piece = zero.grad_position[zero.get_param_id(p)]
            for r in range(world):
                numel = min(piece, p.ds_numel - r * piece)
                if numel > 0:
                    fragments[r].append(Fragment(client.name_of(p), r * piece, flat_start, numel))
        partitions.append(Partition(zero.fp32_partitioned_groups_flat[s], zero.sub_group_to_group_id[s], fragments, rank))
    return partitions


class DeepSpeedEngine:
    """The trainer's engine on DeepSpeed (``engine.TrainEngine``). ``model`` is DeepSpeed's engine
    (it runs the forward), ``module`` the model inside it, ``optimizer`` our client optimizer
    (its param groups and, per flat partition, its state). ``step`` decides skips itself:
    DeepSpeed computes the gradient norm inside its step and already drops a step whose norm is
    not finite."""

    name = "deepspeed"

    def __init__(self, cfg: Any, model: nn.Module, dims: ParallelDims, device: torch.device, accum: int,
                 mixed_precision: bool):
        self.model, self.optimizer = _initialize(model, cfg, dims.dp_size, accum, device)
        self.device, self.bf16 = device, mixed_precision
        self.module, self.zero, self.stage, self.accum = self.model.module, self.model.optimizer, cfg.parallel.zero_stage, accum
        self.group = dims.dp_group
        self.description = f"DeepSpeed ZeRO-{self.stage}"
        self.clips = bool(self.optimizer.attention_layers)

    def forward_backward(self, micro_batches: Sequence[torch.Tensor], loss_fn: LossFn) -> torch.Tensor:
        """DeepSpeed's micro-batch protocol: ``backward`` divides by its gradient_accumulation_steps
        (= A), and ``step`` off the accumulation boundary only counts the micro-batch."""
        if len(micro_batches) != self.accum:
            raise ValueError(f"DeepSpeedEngine: {len(micro_batches)} micro-batches; DeepSpeed was set up for {self.accum}")
        loss_sum = None
        for i, mb in enumerate(micro_batches):
            loss = loss_fn(mb)
            self.model.backward(loss)
            if i < len(micro_batches) - 1:
                self.model.step()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        return loss_sum / len(micro_batches)

    def step(self, lr: float, drop: Optional[str] = None) -> StepOutcome:
        """DeepSpeed's step at the accumulation boundary with our update and QK-Clip; ``drop``: a
        reason to change nothing (e.g. a non-finite loss): DeepSpeed still consumes the gradients."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if drop is None:
            try:
                self.optimizer.prepare_qk_clip()  # reduce + check, before anything changes; a collective
            except NonFiniteMaxLogit as e:
                drop = f"non-finite max logit ({e})"
        self.optimizer.skip_next_step = drop is not None
        try:
            self.model.step()
        finally:
            self.optimizer.skip_next_step = False
        grad_norm = self.model.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else math.nan
        if drop is None and not math.isfinite(grad_norm):
            drop = f"non-finite grad_norm={grad_norm}"  # DeepSpeed dropped it (its overflow path)
        stats = self.optimizer.finish_qk_clip(applied=drop is None)
        if drop is not None:
            forget_step(self.module)
            return StepOutcome(grad_norm, drop)
        return StepOutcome(grad_norm, None, dict(stats) if self.clips else self.read_max_logits())

    def balance_experts(self, rate: float) -> dict[str, Any]:
        return balance_experts(self.module.moe_layers(), rate, self.group)

    def read_max_logits(self) -> dict[str, Any]:
        return read_max_logits(self.module.attention_layers(), self.group)

    @torch.no_grad()
    def evaluate(self, batches: Sequence[torch.Tensor], loss_fn: LossFn) -> list[torch.Tensor]:
        return [loss_fn(batch) for batch in batches]

    def measure_max_logits(self, micro_batches: Sequence[torch.Tensor]) -> dict[str, Any]:
        return measure_max_logits(self.module, micro_batches, self.device, self.bf16, self.group)

    def state_dict(self, checkpoint: Any = None) -> dict[str, Any]:
        """Views into ZeRO's partitions (deepspeed_checkpoint.py): loading into it writes them."""
        return checkpoint_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_checkpoint_state(self, state)

    def state_is_finite(self) -> bool:
        """The fp32 master partitions and their optimizer state (stage 3's working weights are
        partitions too: the model shows none), and the model's buffers."""
        masters = [part.tensor for part in self.optimizer.partitions.values()]
        return all_finite(*masters, self.optimizer, *self.module.buffers())

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every parameter's whole reduced gradient, fp32 (a collective; after the last backward of
        a step, before its step)."""
        from deepspeed.utils import safe_get_full_grad

        return {name: safe_get_full_grad(p).detach().float().clone() for name, p in self.module.named_parameters()}
