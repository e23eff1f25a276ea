"""Grouped GEMM for the routed experts: one matmul per expert over its contiguous token block.

Legend: T tokens (sorted by expert), K input features, N output features, E experts.
``offs_E`` is int32, the cumulative END offset of each expert's block (offs[-1] == T).

Backends (all differentiable in x and w):

- ``"loop"``: one ``x_e @ w[e]`` per expert, the reference every other path is tested against.
- ``"torch"``: ``torch.nn.functional.grouped_mm`` (forward and its own backward). Its
  backward rejects a zero-stride (expanded) gradient, e.g. from ``y.sum()``, so the
  gradient is made contiguous first.
- ``"triton"``: kimi_train.kernels.grouped_gemm_triton (forward, dx and dw in Triton).
- ``"auto"``: the backend the installed choice map names for this call's key
  ``"K,N,E,dtype,bucket"`` (bucket: T rounded up to a power of two), where that backend can
  run these tensors; otherwise (a key not in the map, or under ``torch.compile``) the fixed
  default: "torch" where grouped_mm's constraints hold, else "triton" on CUDA, else "loop".
  Nothing is timed during training. ``tune_grouped_gemm`` builds the map once before
  training, on every rank: on CUDA it times "torch" against "triton" for every key the model
  can hit and takes the max of each time over the ranks, so every rank gets the same map;
  with a path it writes the map to that file and, on resume, loads it instead of timing.

The environment variable ``KIMI_TRAIN_GROUPED_GEMM`` (loop | torch | triton) overrides
"auto" everywhere, the map included, e.g. to turn the Triton path off.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

BACKENDS = ("auto", "loop", "torch", "triton")
_ENV_VAR = "KIMI_TRAIN_GROUPED_GEMM"
_CANDIDATES = ("torch", "triton")  # what tuning times against each other; ties go to the first
_choices: dict[str, str] = {}  # "K,N,E,dtype,bucket" -> backend, installed by tune_grouped_gemm


def grouped_gemm_reference(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Per-expert loop: the reference every other path is tested against."""
    outs, start = [], 0
    for e, end in enumerate(offs_E.tolist()):
        outs.append(x_TK[start:end] @ w_EKN[e])
        start = end
    if not outs:
        return x_TK.new_zeros(x_TK.shape[0], w_EKN.shape[-1])
    return torch.cat(outs, dim=0)


def _grouped_mm_ok(x_TK: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    # torch's grouped_mm wants 16-byte aligned strides and (on CUDA) bf16 on sm80+.
    if not hasattr(F, "grouped_mm"):
        return False
    if x_TK.is_cuda and x_TK.dtype != torch.bfloat16:
        return False
    if torch.compiler.is_compiling() and x_TK.dtype != torch.bfloat16:
        return False  # torch.compile's shape rule for grouped_mm accepts bf16 only, on every device
    itemsize = x_TK.element_size()
    return (x_TK.shape[-1] * itemsize) % 16 == 0 and (w_EKN.shape[-1] * itemsize) % 16 == 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (grouped_mm's backward needs one)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        return dy.contiguous()


def _grouped_mm_torch(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    y_TN = F.grouped_mm(x_TK, w_EKN, offs=offs_E.to(torch.int32))
    return _ContiguousGrad.apply(y_TN) if torch.is_grad_enabled() and y_TN.requires_grad else y_TN


def _triton_usable(x_TK: torch.Tensor) -> bool:
    if not x_TK.is_cuda:
        return False
    try:
        from kimi_train.kernels.grouped_gemm_triton import TRITON_AVAILABLE
    except ImportError:
        return False
    return TRITON_AVAILABLE


def _time_backend_ms(backend: str, x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor,
                     reps: int = 3) -> float:
    """Forward time of one backend at this shape (CUDA events, after one warm-up call)."""
    if backend == "triton":
        from kimi_train.kernels.grouped_gemm_triton import grouped_gemm_triton as run
    else:
        run = _grouped_mm_torch
    with torch.no_grad():
        x_TK, w_EKN = x_TK.detach(), w_EKN.detach()
        run(x_TK, w_EKN, offs_E)  # warm-up; also compiles and autotunes the Triton kernel for this shape
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run(x_TK, w_EKN, offs_E)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _bucket(T: int) -> int:
    """T rounded up to a power of two: the routing moves T from step to step (under EP)."""
    return 1 << max(T - 1, 0).bit_length()


def _key(T: int, K: int, N: int, E: int, dtype: torch.dtype) -> str:
    return f"{K},{N},{E},{str(dtype).removeprefix('torch.')},{_bucket(T)}"


def _runs_here(backend: str, x_TK: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    if backend == "torch":
        return _grouped_mm_ok(x_TK, w_EKN)
    return _triton_usable(x_TK) if backend == "triton" else backend == "loop"


def _default_backend(x_TK: torch.Tensor, w_EKN: torch.Tensor) -> str:
    """The fixed choice where the map has none: grouped_mm (the faster one on an H200, see
    docs/kernels.md), else the Triton kernel on CUDA (fp32), else the loop."""
    if _grouped_mm_ok(x_TK, w_EKN):
        return "torch"
    return "triton" if _triton_usable(x_TK) else "loop"


def _expert_shapes(model_or_shapes: Union[torch.nn.Module, Iterable[tuple[int, int, int]]]) -> list[tuple]:
    """(E, K, N) of every grouped GEMM the model runs: per GroupedExperts, gate/up [E, D, I] and
    down [E, I, D], with E the experts local to this rank under expert parallelism."""
    if not isinstance(model_or_shapes, torch.nn.Module):
        return sorted({tuple(int(v) for v in shape) for shape in model_or_shapes})
    from kimi_train.model.moe import GroupedExperts  # here, not at the top: moe imports this module

    shapes = set()
    for module in model_or_shapes.modules():
        if isinstance(module, GroupedExperts):
            E = module.num_experts // getattr(module, "ep_size", 1)
            I, D = module.gate_proj.shape[1:]  # [E, out, in]; a DTensor's global shape, dims 1, 2 unsharded
            shapes |= {(E, D, I), (E, I, D)}
    return sorted(shapes)


def _measure(keys: list[str], device: torch.device) -> torch.Tensor:
    """times_KC [len(keys), len(_CANDIDATES)] in ms: inf where a candidate cannot run here (or
    failed), 0 where only one can (nothing to time), else its forward time at T = the bucket."""
    times = torch.full((len(keys), len(_CANDIDATES)), float("inf"), dtype=torch.float64)
    parsed = [(int(K), int(N), int(E), getattr(torch, dtype), int(T))
              for K, N, E, dtype, T in (key.split(",") for key in keys)]
    # Largest bucket first: the Triton kernel autotunes its tiles per (K, N, E) at its first call.
    for i in sorted(range(len(keys)), key=lambda i: -parsed[i][-1]):
        K, N, E, dtype, T = parsed[i]
        probe_x = torch.empty(1, K, dtype=dtype, device=device)
        probe_w = torch.empty((), dtype=dtype, device=device).expand(E, K, N)
        usable = [_runs_here(name, probe_x, probe_w) for name in _CANDIDATES]
        if sum(usable) < 2:
            times[i] = torch.tensor([0.0 if ok else float("inf") for ok in usable], dtype=torch.float64)
            continue
        x_TK = torch.randn(T, K, dtype=dtype, device=device)
        w_EKN = (torch.randn(E, N, K, dtype=dtype, device=device) * K**-0.5).transpose(1, 2)  # the model's layout
        offs_E = (torch.arange(1, E + 1, device=device) * T // E).to(torch.int32)  # balanced routing
        for c, name in enumerate(_CANDIDATES):
            try:
                times[i, c] = _time_backend_ms(name, x_TK, w_EKN, offs_E)
            except Exception:  # e.g. grouped_mm unsupported on this GPU generation: it loses
                pass
    return times


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _load(path: Path, device_name: str) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
        choices = {str(k): str(v) for k, v in saved["choices"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a grouped GEMM choice map ({e!r}); delete it to re-tune") from None
    bad = sorted(set(choices.values()) - {"loop", *_CANDIDATES})
    if bad:
        raise ValueError(f"{path} names backend {bad[0]!r}; valid: 'loop', 'torch', 'triton'")
    if saved.get("device") != device_name:
        warnings.warn(f"{path} was tuned on {saved.get('device')!r}, this run is on {device_name!r}: "
                      "re-tuning the grouped GEMM choices and overwriting it", stacklevel=3)
        return {}
    return choices


def tune_grouped_gemm(
    model_or_shapes: Union[torch.nn.Module, Iterable[tuple[int, int, int]]],
    max_tokens: int,
    device: Union[str, torch.device],
    dtype: torch.dtype,
    group: Optional[Any] = None,
    path: Optional[Union[str, Path]] = None,
) -> dict[str, str]:
    """Choose the ``"auto"`` backend for every grouped GEMM the model can run, the same on every
    rank, install the choices and return them ({"K,N,E,dtype,bucket": backend}).

    Call once on every rank of ``group`` (None: the default group) after the model is
    parallelised and before the first forward; it is collective when torch.distributed is
    initialised. ``model_or_shapes``: the model (its GroupedExperts, local experts under EP)
    or (E, K, N) triples. ``max_tokens``: the most rows one call can get on a rank, e.g.
    micro_batch_size * seq_len * num_experts_per_tok * ep (every rank sending all its slots
    to one rank's experts); every power-of-two bucket up to it is chosen. ``dtype``: the
    experts' compute dtype (bf16 under autocast).

    On CUDA, where both "torch" and "triton" can run a key, both forwards are timed at
    T = the bucket with balanced routing, and each time is replaced by its max over the ranks
    (one all_reduce): the choice is the one whose slowest rank is fastest, identical on every
    rank. Elsewhere the only runnable candidate is taken without timing (on CPU: "torch" where
    grouped_mm's alignment holds, else "loop").

    ``path`` (read and written on the group's rank 0 only, broadcast to the others): the
    choices already in the file are reused as they are; only keys it lacks are tuned and
    added. A file tuned on another device name is re-tuned with a warning. With
    ``KIMI_TRAIN_GROUPED_GEMM`` set on rank 0 nothing is timed (the override wins anyway).
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r}; must be an int >= 1")
    device = torch.device(device)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    first = not distributed or dist.get_rank(group) == 0
    payload: list[Any] = [None]
    if first:
        # Rank 0 alone decides what is loaded and what is wanted, so every rank takes the same branch.
        buckets = [1 << i for i in range(_bucket(max_tokens).bit_length())]
        wanted = [_key(T, K, N, E, dtype) for E, K, N in _expert_shapes(model_or_shapes) for T in buckets]
        saved = _load(Path(path), _device_name(device)) if path is not None else {}
        overridden = os.environ.get(_ENV_VAR, "auto") not in ("", "auto")
        payload = [(saved, [k for k in wanted if k not in saved], overridden)]
    if distributed:
        dist.broadcast_object_list(payload, src=dist.get_global_rank(group or dist.group.WORLD, 0), group=group)
    saved, missing, overridden = payload[0]
    new: dict[str, str] = {}
    if missing and not overridden:
        times = _measure(missing, device)
        if distributed:
            times = times.to(device)
            dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
            times = times.cpu()
        for key, row in zip(missing, times):
            new[key] = _CANDIDATES[int(row.argmin())] if bool(row.isfinite().any()) else "loop"
    choices = {**saved, **new}
    _choices.clear()
    _choices.update(choices)
    if first and path is not None and new:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        in_order = sorted(choices.items(), key=lambda kv: [int(v) if v.isdigit() else v for v in kv[0].split(",")])
        record = {"device": _device_name(device), "torch": torch.__version__, "choices": dict(in_order)}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
    return choices


def resolve_backend(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor, backend: str = "auto") -> str:
    """The concrete backend ("loop" | "torch" | "triton") that ``grouped_gemm`` would run."""
    if backend not in BACKENDS:
        raise ValueError(f"grouped_gemm backend={backend!r}; valid: {', '.join(map(repr, BACKENDS))}")
    if backend == "auto":
        backend = os.environ.get(_ENV_VAR, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{_ENV_VAR}={backend!r}; valid: {', '.join(map(repr, BACKENDS))}")
    if backend != "auto":
        return backend
    if not torch.compiler.is_compiling():  # traced graphs keep the default (the Triton path is untested there)
        choice = _choices.get(_key(x_TK.shape[0], *w_EKN.shape[-2:], w_EKN.shape[0], x_TK.dtype))
        if choice is not None and _runs_here(choice, x_TK, w_EKN):
            return choice
    return _default_backend(x_TK, w_EKN)


def grouped_gemm(
    x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """y[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]. Differentiable in x and w.

    x_TK [T, K] sorted by expert; w_EKN [E, K, N] (the [E, out, in] expert weight
    transposed); offs_E int cumulative ends, offs[-1] == T. backend: "auto" | "loop" |
    "torch" | "triton" (see the module docstring).
    """
    backend = resolve_backend(x_TK, w_EKN, offs_E, backend)
    if backend == "loop":
        return grouped_gemm_reference(x_TK, w_EKN, offs_E)
    if backend == "torch":
        return _grouped_mm_torch(x_TK, w_EKN, offs_E)
    try:
        from kimi_train.kernels.grouped_gemm_triton import grouped_gemm_triton
    except ImportError:
        raise RuntimeError("grouped_gemm backend='triton' needs triton; use 'torch' or 'loop'") from None
    return grouped_gemm_triton(x_TK, w_EKN, offs_E)
