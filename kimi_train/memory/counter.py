"""Count the activations a forward leaves alive for its backward.

Every tensor an op creates while the counter is active is noted by its storage (a weak
reference, so noting keeps nothing alive). After the forward, the caller's references to the
outputs are dropped (their autograd graph is kept) and the storages still alive are what the
graph holds: autograd's saved tensors, and whatever activation checkpointing stored, which
outer saved-tensor hooks cannot see. Parameter and buffer storages never count, nor do
storages created before the counter started (the caller's inputs are cloned inside it, so an
input the forward saves is counted).

    count = count_activations(layer, x_BTD, cos, sin, module=layer)
    count.bytes / (B * T)                       # bytes per token
    count.by_op()                               # which ops created what is kept

Legend: B batch, T sequence, D hidden size.
"""

from __future__ import annotations

import gc
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten, tree_map_only


@dataclass(frozen=True)
class SavedStorage:
    """One storage the forward left alive: its size and the op (and the first tensor) that made it."""

    nbytes: int
    op: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class ActivationCount:
    """What a forward keeps: ``bytes`` in all, and ``storages`` one by one (largest first)."""

    storages: list[SavedStorage] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(s.nbytes for s in self.storages)

    def by_op(self) -> dict[str, int]:
        """Bytes kept per creating op, largest first."""
        out: dict[str, int] = defaultdict(int)
        for s in self.storages:
            out[s.op] += s.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


class _StorageRecorder(TorchDispatchMode):
    """Notes the storage of every tensor an op returns (once per storage: views share it)."""

    def __init__(self, excluded: set[int]):
        super().__init__()
        self.excluded = excluded  # data_ptrs of parameters and buffers
        self.seen: dict[int, tuple[weakref.ref, SavedStorage]] = {}

    def note(self, t: torch.Tensor, op: str) -> None:
        st = _inner(t).untyped_storage()
        ptr = st.data_ptr()
        if ptr in self.excluded or st.nbytes() == 0:
            return
        known = self.seen.get(ptr)
        if known is not None and known[0]() is st:
            return  # a view of a storage already noted
        # A storage freed and its address reused gets a new entry; the dead one is dropped.
        self.seen[ptr] = (weakref.ref(st), SavedStorage(st.nbytes(), op, t.dtype, tuple(t.shape)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view or an in-place result shares an input's storage: it is that storage, noted when it
        # was made (or made before counting began, and then not an activation of this forward).
        inputs = {_inner(t).untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta and _inner(t).untyped_storage().data_ptr() not in inputs:
                self.note(t, str(func.overloadpacket.__name__))
        return out

    def alive(self) -> list[SavedStorage]:
        return sorted((rec for ref, rec in self.seen.values() if ref() is not None), key=lambda s: -s.nbytes)


def _inner(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding the storage: a wrapper subclass (a DTensor parameter under expert
    parallelism, funcol's AsyncCollectiveTensor) has none of its own."""
    while is_traceable_wrapper_subclass(t):
        t = getattr(t, t.__tensor_flatten__()[0][0])
    return t


def _state_ptrs(modules: Iterable[nn.Module]) -> set[int]:
    ptrs = set()
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            ptrs.add(_inner(t).untyped_storage().data_ptr())
    return ptrs


def count_activations(fn: Callable[..., Any], *args: Any, module: Optional[nn.Module] = None, **kwargs: Any) -> ActivationCount:
    """Run ``fn(*args, **kwargs)`` (a forward with grad) and count what it leaves alive for backward.

    module: whose parameters and buffers are excluded (default: ``fn`` when it is a module).
    Tensor arguments that require no grad and are floating point are cloned inside the counter, so an
    input that the forward saves counts (a layer is charged for keeping its input); integer inputs
    (token ids) are passed as they are. The graph is freed before returning.
    """
    module = module if module is not None else (fn if isinstance(fn, nn.Module) else None)
    recorder = _StorageRecorder(_state_ptrs([module]) if module is not None else set())
    with recorder:
        args, kwargs = tree_map_only(
            torch.Tensor, lambda t: t.clone() if t.is_floating_point() and not t.requires_grad else t, (args, kwargs))  # fmt: skip
        out = fn(*args, **kwargs)
        del args, kwargs
    graph = [t.grad_fn for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    del out
    gc.collect()
    count = ActivationCount(recorder.alive())
    del graph
    return count


__all__ = ["ActivationCount", "SavedStorage", "count_activations"]
