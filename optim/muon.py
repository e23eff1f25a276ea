"""Muon for hidden matrices, AdamW for everything else, in one optimizer.

Shape legend: B = batch of matrices fed to one Newton-Schulz call, n x m = one
matrix (3-D expert weights [E, n, m] count as E matrices).

For each Muon parameter W (n x m) with gradient G, learning rate lr, weight decay wd:

    M <- mu M + G                          (momentum, a plain sum: no (1 - mu) factor)
    U  = G + mu M   if nesterov   else M
    O  = NS(U) * scale(n, m)
    W <- W (1 - lr wd) - lr O              (decoupled weight decay with the unscaled lr)

    scale = 0.2 sqrt(max(n, m))  "match_rms_adamw": update RMS ~ 0.2, like AdamW's, so
                                  Muon reuses AdamW's lr and wd (Moonlight, Kimi K2)
            sqrt(max(1, n / m))  "original" (Keller Jordan)
            1                    "none"

torch.optim.Muon keeps the momentum as an EMA, M' = mu M' + (1 - mu) G, which is
exactly (1 - mu) times ours (and so is its Nesterov blend); NS divides by the
Frobenius norm first, so both give the same update.

Groups with ``use_muon=False`` run AdamW (betas ``adamw_betas``, eps ``adamw_eps``,
bias correction, decoupled weight decay lr * wd), with the group's own lr and wd.

Speed: momentum and AdamW use torch._foreach ops (a few kernels for all
parameters); same-shape matrices of a group share ONE batched NS call, whose
buffer is filled straight from the momentum (U is never materialised) and read
straight into the weights; the non-finite check is one fused 2-norm reduction.
All optimizer state is fp32, also for bf16 parameters.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from .layout import block
from .newton_schulz import NS_BACKENDS, NS_METHODS, ApplyFn, FillFn, newton_schulz_, orthogonalize_local_

try:  # DTensor parameters (FSDP2, EP) go through the owner-computes core; optional on torch builds without it
    from . import distributed as _distributed
except ImportError:  # pragma: no cover
    _distributed = None  # type: ignore[assignment]

__all__ = ["Muon", "ADJUST_LR", "muon_scale", "muon_update_"]

ADJUST_LR = ("match_rms_adamw", "original", "none")
# ns_dtype may be given as a string (config files): these names map to dtypes
NS_DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64, "float64": torch.float64,
}

try:  # DTensor exists in every torch >= 2.4 build, but keep the optimizer importable without it
    from torch.distributed.tensor import DTensor
except Exception:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


def _is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, the tensor itself otherwise (elementwise maths)."""
    return t.to_local() if _is_dtensor(t) else t


def muon_scale(shape: torch.Size | tuple[int, ...], adjust_lr: str) -> float:
    """Update scale for a matrix of ``shape`` ([n, m], or [E, n, m] for a batch)."""
    n, m = shape[-2], shape[-1]
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(n, m))
    if adjust_lr == "original":
        return math.sqrt(max(1.0, n / m))
    return 1.0


class Muon(torch.optim.Optimizer):
    """Muon (momentum + Newton-Schulz orthogonalisation) with an AdamW side for the rest.

    Args:
        params: parameters, (name, parameter) pairs, or param groups (dicts). A group's
            ``use_muon`` (default True) picks Muon or AdamW; ``optim.muon_param_groups``
            builds both groups for a model and names every parameter ("param_names").
        lr, weight_decay: shared by both kinds (with match_rms_adamw Muon reuses AdamW's).
        momentum, nesterov: Muon momentum mu and the Nesterov variant.
        ns_steps, ns_method, ns_dtype, ns_backend: Newton-Schulz settings (see newton_schulz);
            ns_dtype also takes a name ("bf16", "fp32", "bfloat16", ...).
        adjust_lr: "match_rms_adamw" | "original" | "none" (see module docstring).
        adamw_betas, adamw_eps: for the AdamW groups.
        check_finite: refuse a step whose gradients hold a NaN/Inf (ValueError naming the
            parameter, state unchanged), at the cost of one fused norm over all gradients
            and one host sync per step. False skips the check, for callers that already check the loss or
            grad norm; a NaN gradient then reaches the state and the weights, as in torch's
            optimizers. For the whole optimizer, not per group, and not in the state_dict.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2e-4,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        ns_steps: int = 5,
        ns_method: str = "keller",
        ns_dtype: torch.dtype | str = torch.bfloat16,
        adjust_lr: str = "match_rms_adamw",
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        ns_backend: str = "auto",
        check_finite: bool = True,
    ):
        if not isinstance(check_finite, bool):
            raise ValueError(f"Muon: check_finite={check_finite!r} is invalid; expected True or False")
        self.check_finite = check_finite
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_method=ns_method,
            ns_dtype=ns_dtype,
            ns_backend=ns_backend,
            adjust_lr=adjust_lr,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
            use_muon=True,
        )
        _check_group(defaults, "defaults")
        super().__init__(params, defaults)  # calls add_param_group for each group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, plus: check the group's settings, create its state."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group, f"param group {len(self.param_groups) - 1}")
            for p in group["params"] if group["use_muon"] else ():
                if p.ndim < 2:
                    raise ValueError(
                        f"Muon: parameter {self._name(group, p)} has shape {tuple(p.shape)}; Muon groups take "
                        f"2-D or 3-D matrices, put it in a group with use_muon=False (see optim.muon_param_groups)"
                    )
        except ValueError:
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise
        self.init_state()

    # ----------------------------------------------------------------- state
    @torch.no_grad()
    def init_state(self) -> None:
        """Create (zero) state for every parameter, so the checkpoint layout does not
        depend on which parameters have seen a gradient yet (same on every rank)."""
        for group in self.param_groups:
            for p in group["params"]:
                self._init_param_state(p, group["use_muon"])

    def _init_param_state(self, p: Tensor, use_muon: bool) -> None:
        state = self.state[p]
        if state:
            return
        if use_muon:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
        else:
            # step on CPU like torch's AdamW: bias corrections are computed on the host
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to each parameter's dtype on load (bf16 params would lose
        # their fp32 moments); put back the saved values at fp32, as private copies.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(pid, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    device = "cpu" if key == "step" else p.device
                    self.state[p][key] = value.detach().to(device=device, dtype=torch.float32).clone()
        self.init_state()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.check_finite:
            self._check_finite_grads()  # before any state changes
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _name(self, group: dict[str, Any], p: Tensor) -> str:
        names = group.get("param_names")
        idx = next(i for i, q in enumerate(group["params"]) if q is p)
        if names is not None:
            return repr(names[idx])
        return f"#{idx} of param group {self.param_groups.index(group)}"

    def _check_finite_grads(self) -> None:
        """One fused reduction and one host sync for all gradients; raises before any state changes.

        The 2-norm of every gradient (a foreach kernel, ~5x cheaper than an inf-norm on a CPU)
        summed into one scalar: it is finite iff every entry is, except when squares overflow
        (|g| ~ 1e19), which the exact inf-norm pass that names the parameter sorts out.
        With DTensor (sharded) gradients a NaN may sit in one rank's shard only; the verdict
        is then MAX-reduced over the default group so that every rank raises, none hangs.
        """
        grads, owners = [], []
        sharded = False
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and _local(p.grad).numel():
                    sharded = sharded or _is_dtensor(p.grad)
                    grads.append(_local(p.grad))
                    owners.append((group, p))
                elif p.grad is not None:
                    sharded = sharded or _is_dtensor(p.grad)
        bad = None
        by_device: dict[torch.device, list[int]] = defaultdict(list)
        for i, g in enumerate(grads):
            by_device[g.device].append(i)
        for idx in by_device.values():
            norms = torch._foreach_norm([grads[i] for i in idx], 2)
            if math.isfinite(torch.stack(norms).float().sum().item()):
                continue
            for i in idx:  # rare: find the culprit with the exact test
                if not bool(torch.isfinite(torch.linalg.vector_norm(grads[i], ord=math.inf))):
                    bad = i
                    break
            if bad is not None:
                break
        if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
            device = grads[0].device if grads else torch.device("cpu")
            flag = torch.tensor([0.0 if bad is None else 1.0], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if bad is None and flag.item() > 0:
                raise ValueError("Muon: non-finite gradient (nan/inf) on another rank; step refused, state unchanged")
        if bad is not None:
            group, p = owners[bad]
            raise ValueError(
                f"Muon: non-finite gradient (nan/inf) in parameter {self._name(group, p)}; step refused, state unchanged"
            )

    def _step_group(self, group: dict[str, Any]) -> None:
        """One param group's update: Muon or AdamW by ``use_muon`` (every engine's step comes here)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        if group["use_muon"]:
            self._muon_step(group, params)
        else:
            self._adamw_step(group, params)

    def _muon_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Muon on whole tensors or DTensor shards (optim.distributed owner computes)."""
        W = [_local(p) for p in params]
        G = [_local(p.grad).float() for p in params]  # type: ignore[union-attr]
        M = [_local(self.state[p]["momentum_buffer"]) for p in params]
        if any(_is_dtensor(p) for p in params):
            if not all(_is_dtensor(p) for p in params):
                raise ValueError("Muon: a Muon param group mixes DTensor and plain tensor parameters; shard all or none")
            if _distributed is None:
                raise NotImplementedError("Muon: DTensor parameters need optim.distributed, which is not available")

            def orthogonalize(ns, fill, apply):
                _distributed.orthogonalize_(params, ns, group["ns_dtype"], fill, apply)
        else:
            def orthogonalize(ns, fill, apply):
                orthogonalize_local_([(i, p.shape, p.device) for i, p in enumerate(params)], ns, group["ns_dtype"],
                                     fill, apply)
        muon_update_(group, W, G, M, [p.shape for p in params], orthogonalize)

    def _adamw_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["adamw_betas"]
        eps = group["adamw_eps"]
        states = [self.state[p] for p in params]
        locals_ = [_local(p) for p in params]
        grads = [_local(p.grad).float() for p in params]  # type: ignore[union-attr]
        exp_avgs = [_local(s["exp_avg"]) for s in states]
        exp_avg_sqs = [_local(s["exp_avg_sq"]) for s in states]
        for s in states:
            s["step"] += 1
        if _fused_adamw_ok(locals_ + grads):
            torch._fused_adamw_(locals_, grads, exp_avgs, exp_avg_sqs, [], [s["step"] for s in states], lr=lr,
                                beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
            return
        steps = [s["step"].item() for s in states]  # CPU tensors: no device sync

        if wd != 0:
            torch._foreach_mul_(locals_, 1.0 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        step_sizes = [-lr / (1.0 - beta1**t) for t in steps]
        bias_correction2_sqrt = [math.sqrt(1.0 - beta2**t) for t in steps]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(locals_, exp_avgs, denom, step_sizes)


def muon_update_(
    group: dict[str, Any],
    W: list[Tensor],
    G: list[Tensor],
    M: list[Tensor],
    shapes: list[tuple[int, ...]],
    orthogonalize: Callable[[Callable[[Tensor], Tensor], FillFn, ApplyFn], None],
) -> None:
    """Muon's update of one group, on whatever pieces of its matrices this rank stores.

    ``W``, ``G``, ``M``: this rank's storage of each parameter, its fp32 gradient and momentum
    (whole tensors, DTensor shards or flat fragments: the elementwise maths does not care);
    ``shapes``: each parameter's FULL shape (for the update scale); ``orthogonalize(ns, fill,
    apply)``: the storage's way to NS every whole matrix (optim.distributed). The Nesterov
    update U = G + mu M is never materialised: ``fill`` writes it, cast to the NS dtype,
    straight into the NS batch buffer or the all-to-all send buffer, and ``apply`` adds each
    orthogonalised piece straight from the NS output or the receive buffer into the weight.
    """
    lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
    if M and M[0].device.type == "cpu":  # one pass over M; foreach on a CPU is a loop anyway
        for M_, G_ in zip(M, G):
            torch.add(G_, M_, alpha=mu, out=M_)  # M <- mu M + G
    elif M:  # two multi-tensor kernels beat a launch per parameter
        torch._foreach_mul_(M, mu)
        torch._foreach_add_(M, G)
    if wd != 0:
        torch._foreach_mul_(W, 1.0 - lr * wd)  # W <- W (1 - lr wd), before the update lands
    steps = [-lr * muon_scale(shape, group["adjust_lr"]) for shape in shapes]

    if group["nesterov"]:
        def fill(i: int, key: Any, out: Tensor) -> None:
            torch.add(block(G[i], key), block(M[i], key), alpha=mu, out=out)  # U = G + mu M
    else:
        def fill(i: int, key: Any, out: Tensor) -> None:
            out.copy_(block(M[i], key))

    def apply(i: int, key: Any, O: Tensor) -> None:
        block(W[i], key).add_(O, alpha=steps[i])  # W <- W - lr scale O

    def ns(X_Bnm: Tensor) -> Tensor:
        return newton_schulz_(X_Bnm, group["ns_steps"], group["ns_method"], group["ns_backend"])

    orthogonalize(ns, fill, apply)


def _fused_adamw_ok(tensors: list[Tensor]) -> bool:
    """torch's fused AdamW kernel for fp32 tensors on a CPU: ~2.4x faster than the foreach ops
    there (8.4M parameters, 2 threads), the same update (tested against torch's AdamW). On
    CUDA the foreach ops stay: the fused kernel wants the step counters on the device."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _check_group(group: dict[str, Any], where: str) -> None:
    """One-line ValueErrors for bad hyperparameters (defaults or a param group)."""

    def bad(key: str, valid: str) -> ValueError:
        return ValueError(f"Muon {where}: {key}={group[key]!r} is invalid; expected {valid}")

    if not (isinstance(group["lr"], (int, float)) and group["lr"] >= 0):
        raise bad("lr", "a float >= 0")
    if not (0 <= group["momentum"] < 1):
        raise bad("momentum", "0 <= momentum < 1")
    if not group["weight_decay"] >= 0:
        raise bad("weight_decay", "a float >= 0")
    if not (isinstance(group["ns_steps"], int) and group["ns_steps"] >= 1):
        raise bad("ns_steps", "an int >= 1")
    if group["ns_method"] not in NS_METHODS:
        raise bad("ns_method", " | ".join(NS_METHODS))
    if isinstance(group["ns_dtype"], str) and group["ns_dtype"] in NS_DTYPE_NAMES:
        group["ns_dtype"] = NS_DTYPE_NAMES[group["ns_dtype"]]
    if group["ns_dtype"] not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise bad("ns_dtype", "torch.bfloat16 | float16 | float32 | float64, or one of " + ", ".join(NS_DTYPE_NAMES))
    if group["ns_backend"] not in NS_BACKENDS:
        raise bad("ns_backend", " | ".join(NS_BACKENDS))
    if group["adjust_lr"] not in ADJUST_LR:
        raise bad("adjust_lr", " | ".join(ADJUST_LR))
    betas = group["adamw_betas"]
    if not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise bad("adamw_betas", "two floats in [0, 1)")
    if not group["adamw_eps"] > 0:
        raise bad("adamw_eps", "a float > 0")
    if not isinstance(group["use_muon"], bool):
        raise bad("use_muon", "True or False")
