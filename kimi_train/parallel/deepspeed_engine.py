"""DeepSpeed ZeRO (stages 1, 2, 3) as the other engine, applied from outside the model like apply_fsdp.

    engine, optimizer = apply_deepspeed(model, cfg, dims, accum)    # parallel.engine=deepspeed

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
step is ``DeepSpeedOptimizer.step``, which also runs QK-Clip around it.

Expert parallelism is not supported on this engine (parallel.ep > 1 is a config error).
Checkpoints: ``checkpoint_state`` / ``load_checkpoint_state`` below (see docs/distributed.md).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from kimi_train.errors import UserError
from optim import NonFiniteMaxLogit, muon_param_groups
from optim.flat import Fragment, Partition, PartitionedMuonClip

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


def build_client_optimizer(cfg: Any, model: nn.Module, process_group: Any = None) -> PartitionedMuonClip:
    """optim=muonclip|muon|adamw as PartitionedMuonClip: adamw puts every parameter in one AdamW group."""
    o = cfg.optim
    if o.name == "adamw":
        names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        groups = [{"params": list(params), "param_names": list(names), "use_muon": False}]
    else:
        groups = muon_param_groups(model, lr=o.lr, weight_decay=o.weight_decay)
    clip = o.name == "muonclip" and o.qk_clip.enabled
    return PartitionedMuonClip(
        groups, attention_layers=model.attention_layers() if clip else None, tau=o.qk_clip.tau if clip else None,
        process_group=process_group, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
        weight_decay=o.weight_decay, ns_steps=o.ns_steps, ns_method=o.ns_method, ns_dtype=o.ns_dtype,
        ns_backend=o.ns_backend, adjust_lr=o.adjust_lr, adamw_betas=tuple(o.betas), adamw_eps=o.eps)


def apply_deepspeed(model: nn.Module, cfg: Any, dp_size: int, accum: int, device: torch.device):
    """Wrap ``model`` in a DeepSpeed engine (ZeRO stage ``cfg.parallel.zero_stage``) with our
    MuonClip maths; returns (engine, DeepSpeedOptimizer). Every rank calls it."""
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
    client = build_client_optimizer(cfg, model)
    config = deepspeed_config(cfg, dp_size, accum)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config, dist_init_required=False)
    zero = engine.optimizer
    _guard(engine, zero, client, cfg)
    group = zero.dp_process_group
    client.process_group = group
    stage = cfg.parallel.zero_stage
    partitions = _zero3_partitions(zero, client) if stage == 3 else _zero12_partitions(zero, client)
    client.set_partitions(partitions)
    return engine, DeepSpeedOptimizer(engine, client, stage, clip=bool(client.attention_layers))


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


@dataclass
class StepOutcome:
    grad_norm: float  # the global norm of the reduced gradients before clipping
    skipped: Optional[str] = None  # why the step changed nothing, or None


class DeepSpeedOptimizer:
    """What the trainer holds as ``self.optimizer`` on DeepSpeed: the client optimizer's param
    groups (the lr schedule writes them) and state, a step that runs DeepSpeed's, and the
    checkpoint state. ``step`` decides skips itself: DeepSpeed computes the gradient norm inside
    its step and already drops a step whose norm is not finite."""

    def __init__(self, engine: Any, client: PartitionedMuonClip, stage: int, clip: bool):
        self.engine, self.client, self.stage, self.clip = engine, client, stage, clip

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.client.param_groups

    @property
    def state(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per partition: its optimizer state and its fp32 master weights ("master"), what a
        checkpoint holds (stage 3's working weights are partitions too: the model shows none)."""
        return {id(part.tensor): {**self.client.state[part.tensor], "master": part.tensor}
                for part in self.client.partitions.values()}

    @property
    def last_stats(self) -> Optional[dict[str, Any]]:
        return self.client.last_stats if self.clip else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """DeepSpeed's step consumes the gradients; nothing is left to clear."""

    def step(self, drop: Optional[str] = None) -> StepOutcome:
        """DeepSpeed's step at the accumulation boundary with our update and QK-Clip; ``drop``: a
        reason to change nothing (e.g. a non-finite loss): DeepSpeed still consumes the gradients."""
        if drop is None:
            try:
                self.client.prepare_qk_clip()  # before anything changes; a collective
            except NonFiniteMaxLogit as e:
                drop = f"non-finite max logit ({e})"
        self.client.skip_next_step = drop is not None
        try:
            self.engine.step()
        finally:
            self.client.skip_next_step = False
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else math.nan
        if drop is None and not math.isfinite(grad_norm):
            drop = f"non-finite grad_norm={grad_norm}"  # DeepSpeed dropped it (its overflow path)
        self.client.finish_qk_clip(applied=drop is None)
        return StepOutcome(grad_norm, drop)

    # ------------------------------------------------------------------ gradients (debugging, tests)
    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every parameter's whole reduced gradient, fp32 (a collective; after the last backward of
        a step, before its step)."""
        from deepspeed.utils import safe_get_full_grad

        return {name: safe_get_full_grad(p).detach().float().clone()
                for name, p in self.engine.module.named_parameters()}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        from .deepspeed_checkpoint import checkpoint_state

        return checkpoint_state(self)

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        from .deepspeed_checkpoint import load_checkpoint_state

        load_checkpoint_state(self, state)
