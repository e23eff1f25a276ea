"""Activation checkpointing applied from outside the model: ``train.activation_checkpointing``.

Each decoder layer's forward runs under torch's non-reentrant checkpoint with a selective policy
(``torch.utils.checkpoint.create_selective_checkpoint_contexts``): the forward stores the outputs
of the ops the policy names and frees everything else; the backward runs the layer's forward again,
taking the stored outputs instead of recomputing those ops. What each mode stores per layer:

    none        what autograd saves (no checkpoint)
    full        the layer's input, the router's top-k, and every collective's output (expert
                parallelism's count exchange, dispatch and combine) and device-to-host copy
    selective   full's, plus every matmul and attention output (nn.Linear, grouped GEMMs, SDPA's
                output and logsumexp) except K2's set: the MLA up-projections (q_b_proj,
                kv_b_proj), and with ``train.recompute_moe_down_proj`` the routed experts' down
                projection. So the RMSNorms, SwiGLU activations, RoPE, casts and the other
                elementwise work are recomputed (K2 report 2.4.3; Megatron's
                ``recompute_modules`` layernorm / moe_act / mla_up_proj)

Statistics are recorded once per forward: the recomputation runs inside
``kimi_train.model.recompute.recomputing()`` (no max-logit record, no routed-token count) and
the per-head max logit is one stored op. Because the collectives and the top-k are stored, a
recomputed layer routes exactly as its forward did and issues no collective and no host sync.

The layer's ``forward`` is replaced on the instance; no wrapper module is inserted, so parameter
names (Muon's groups, checkpoints, the transformers export) stay the same. It is applied before
expert parallelism, torch.compile and FSDP2 or DeepSpeed (parallel.build_engine, for either engine).

An engine's forward hooks on modules inside a layer (FSDP2's nested units: the routed experts
under EP, the router under bf16; DeepSpeed ZeRO-3's gathers on every module) all-gather and free
weights differently in a forward and in its recomputation; their ops pass through the replay
unrecorded (torch's two selective-checkpoint dispatch modes with a pass-through, ``_Where``).

Under torch.compile the recomputation is compiled into the backward (the policy tags the traced
ops; the forward's statistics are recorded once, as in eager). Compile calls the policy while
tracing, where the module hooks that mark K2's set may not have run: what ``selective`` stores
under compile is not measured (the counter sees eager forwards only).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import (CheckpointPolicy, _CachedTorchDispatchMode, _CachingTorchDispatchMode,
                                    checkpoint)  # fmt: skip

from kimi_train.config import ACTIVATION_CHECKPOINTING
from kimi_train.model.moe import GroupedExperts
from kimi_train.model.recompute import recomputing

_aten = torch.ops.aten
# Outputs every mode stores: replaying them keeps routing fixed and issues no collective.
_ALWAYS_STORED = {_aten.topk.default, torch.ops.kimi_train.per_head_max_logits.default}
_COLLECTIVE_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd")
# Outputs selective stores unless K2's set recomputes them.
_MATMULS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten._grouped_mm.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default, _aten._scaled_dot_product_cudnn_attention.default,
}  # fmt: skip
_MLA_UP_PROJECTIONS = ("q_b_proj", "kv_b_proj")


class _Where:
    """Which of K2's recomputed modules the forward is inside (module hooks keep it current)."""

    def __init__(self) -> None:
        self.own_hooks: set[int] = set()  # ids of the hooks registered here
        self.reset()

    def reset(self) -> None:
        """At the start of every checkpointed run: a recomputation stops early (torch raises out of it
        once it has what the backward needs), in the middle of a module, without its closing hooks."""
        self.sharding_hooks = False  # inside an engine's forward hooks on a module in the layer (not its maths)
        self.up_projection = False  # inside an MLA up-projection
        self.experts = False  # inside a GroupedExperts
        self.after_activation = False  # inside the experts, past the SwiGLU: the down projection

    def policy(self, selective: bool, recompute_down: bool) -> Callable:
        def policy_fn(ctx, op, *args, **kwargs):
            if op == _aten.silu.default and self.experts:
                self.after_activation = True
            if op in _ALWAYS_STORED or op.namespace in _COLLECTIVE_NAMESPACES or _is_device_to_host(op, args, kwargs):
                return CheckpointPolicy.MUST_SAVE
            if not selective or op not in _MATMULS or not torch.is_grad_enabled():
                return CheckpointPolicy.PREFER_RECOMPUTE
            if self.up_projection or (recompute_down and self.experts and self.after_activation):
                return CheckpointPolicy.PREFER_RECOMPUTE
            return CheckpointPolicy.MUST_SAVE

        return policy_fn

    def track(self, module: nn.Module, attr: str) -> None:
        def enter(*_):
            setattr(self, attr, True)
            self.after_activation = False

        def leave(*_):
            setattr(self, attr, False)

        self.own_hooks |= {module.register_forward_pre_hook(enter).id, module.register_forward_hook(leave).id}

    def bracket_sharding_hooks(self, layer: nn.Module) -> None:
        """Mark the forward hooks that an engine put on modules inside ``layer``: FSDP2's on nested
        units (the routed experts under EP, the router under bf16), DeepSpeed ZeRO-3's on every
        module. Their all-gathers and frees are sharding, not the layer's maths, and differ between a
        forward and its recomputation, so the checkpoint must not replay them. Called once, at the
        layer's first checkpointed forward, after the engine wrapped the model: these hooks go around
        the engine's."""
        for module in layer.modules():
            foreign = (set(module._forward_pre_hooks) | set(module._forward_hooks)) - self.own_hooks
            if module is layer or not foreign:
                continue
            handles = (module.register_forward_pre_hook(lambda *_: self._sharding(True), prepend=True),  # before the engine's
                       module.register_forward_pre_hook(lambda *_: self._sharding(False)),  # after them
                       module.register_forward_hook(lambda *_: self._sharding(True), prepend=True),
                       module.register_forward_hook(lambda *_: self._sharding(False), always_call=True))
            self.own_hooks |= {h.id for h in handles}

    def _sharding(self, inside: bool) -> None:
        self.sharding_hooks = inside

    def context_fn(self, policy_fn: Callable):
        """torch's selective-checkpoint modes (create_selective_checkpoint_contexts), passing the
        sharding hooks' ops through unrecorded."""
        storage: dict = defaultdict(dict)
        modes = _PassCaching(policy_fn, storage), _PassCached(None, storage)
        for mode in modes:
            mode.where = self
        return modes


class _PassShardingOps:
    """torch's selective-checkpoint mode, except for the ops an engine's hooks issue (``_Where``)."""

    where: _Where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.where.sharding_hooks:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


class _PassCaching(_PassShardingOps, _CachingTorchDispatchMode):
    pass


class _PassCached(_PassShardingOps, _CachedTorchDispatchMode):
    pass


def _is_device_to_host(op, args, kwargs) -> bool:
    """A copy to the host (expert parallelism's split sizes on CUDA): stored, so no sync again."""
    if op not in (_aten._to_copy.default, _aten.copy_.default) or not args:
        return False
    src = args[-1] if op == _aten.copy_.default else args[0]
    dst_device = kwargs.get("device") if op == _aten._to_copy.default else args[0].device
    return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_device is not None \
        and torch.device(dst_device).type == "cpu"


def _checkpointed(layer: nn.Module, where: _Where, context_fn: Callable) -> Callable:
    """The layer's forward under checkpoint; its second run (the backward's recomputation) records nothing."""
    forward = layer.forward
    bracketed = False

    @functools.wraps(forward)
    def run_checkpointed(*args, **kwargs):
        nonlocal bracketed
        if not torch.is_grad_enabled():  # evaluation, the max-logit diagnostic: nothing to save
            return forward(*args, **kwargs)
        if not bracketed:  # at the first forward: the engines wrap the model after this wrapper
            where.bracket_sharding_hooks(layer)
            bracketed = True
        runs = 0

        def run(*a, **k):
            nonlocal runs
            runs += 1
            where.reset()
            if runs == 1:
                return forward(*a, **k)
            with recomputing():
                return forward(*a, **k)

        return checkpoint(run, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    return run_checkpointed


def apply_activation_checkpointing(model: nn.Module, mode: str, recompute_moe_down_proj: bool = False) -> nn.Module:
    """Checkpoint every decoder layer of ``model`` (a KimiForCausalLM) as ``mode`` says (module doc)."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"train.activation_checkpointing={mode!r}; valid: {', '.join(ACTIVATION_CHECKPOINTING)}")
    if mode == "none":
        return model
    # Under torch.compile the recomputation is part of the compiled backward, not a Python rerun: the
    # forward's side effects (the statistics records, this module's run count) must happen once,
    # which this setting allows inside a checkpoint (else each layer falls back to eager).
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    where = _Where()
    if mode == "selective":
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in _MLA_UP_PROJECTIONS:
                where.track(module, "up_projection")
            elif isinstance(module, GroupedExperts) and recompute_moe_down_proj:
                where.track(module, "experts")
    policy = where.policy(selective=mode == "selective", recompute_down=recompute_moe_down_proj)
    context_fn = functools.partial(where.context_fn, policy)
    for layer in model.model.layers:
        layer.forward = _checkpointed(layer, where, context_fn)
    return model


__all__ = ["apply_activation_checkpointing"]
