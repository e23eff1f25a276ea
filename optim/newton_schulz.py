"""Newton-Schulz orthogonalisation: the core of Muon.

Shape legend: B = batch of matrices, n = short side, m = long side (after the
transpose that makes every matrix wide, n <= m).

Given G = U S V^T, Muon wants the "zeroth power" U V^T: every singular value
mapped to 1. Newton-Schulz gets there with matrix products only. After scaling
X_0 = G / ||G||_F (so every singular value is in [0, 1]), each step applies an
odd quintic to the singular values:

    A = X X^T,   B = b A + c A^2,   X <- a X + B X   ==   p(X) = a X + b X^3 + c X^5

The coefficients trade exactness for speed:

- ``keller`` (Keller Jordan): (3.4445, -4.7750, 2.0315) five times. The slope at
  zero is large (a = 3.4) so tiny singular values grow fast; the price is that the
  result does not converge to 1 but oscillates in about [0.7, 1.15], which does
  not hurt training.
- ``polar_express`` (arXiv 2505.16932): a different, minimax-optimal triple per
  step, which lands much closer to 1 after five steps. The input is divided by
  1.02 * ||G||_F for a safety margin against rounding pushing a singular value
  past the polynomials' domain. More steps repeat the last triple.
- ``gram`` (Dao lab, 2026): the same iteration (keller coefficients) carried out
  on the n x n Gram matrix instead of the n x m iterate. Because each step
  multiplies X from the left by a polynomial of X X^T, one can track

      R = X X^T,   P = a I + b R + c R^2,   Q <- P Q,   R <- P R P

  and form X = Q X_0 only at the end: O(n^3) per step instead of O(n^2 m), a win
  when m >> n. Rounding in R compounds, so the iteration restarts once
  (X <- Q X_0, R <- X X^T, Q <- I) after two steps. Square matrices gain nothing
  and use the standard loop. In exact arithmetic it equals ``keller``.

The iteration itself can run in a Triton kernel (``optim/triton_ns.py``); this
function keeps everything else (normalising, transposing, batching, choosing
coefficients) so every backend sees the same input.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["newton_schulz", "newton_schulz_", "ns_coefficients", "ns_cost", "orthogonalize_local_", "NS_METHODS",
           "NS_BACKENDS"]

NS_METHODS = ("keller", "polar_express", "gram")
NS_BACKENDS = ("auto", "torch", "triton")

KELLER_COEFFS = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02
NORM_EPS = 1e-7
GRAM_RESTART_AFTER = 2  # gram: rebuild X and R from scratch after this many steps

_NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def ns_coefficients(method: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) triple of every step for ``method``."""
    if method == "polar_express":
        return [POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)] for i in range(steps)]
    return [KELLER_COEFFS] * steps


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    method: str = "keller",
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> Tensor:
    """Approximately orthogonalise G (2-D [n, m] or batched 3-D [B, n, m]).

    Each matrix of the batch is normalised by its own Frobenius norm. Returns a
    tensor of G's shape in ``dtype`` (the compute dtype); G is not modified.
    ``backend``: "torch" (the default; also what "auto" means) or "triton" (optim.triton_ns
    kernel, an explicit opt-in: on an H200 it measured 0.56-0.77x torch's speed on most shapes,
    docs/kernels.md).
    """
    _check_args(G, steps, method, dtype, backend)
    G_Bnm = G if G.ndim == 3 else G.unsqueeze(0)
    transposed = G_Bnm.size(-2) > G_Bnm.size(-1)
    if transposed:  # iterate on the wide orientation: the Gram matrix is the small n x n one
        G_Bnm = G_Bnm.mT
    X_Bnm = torch.empty(G_Bnm.shape, dtype=dtype, device=G.device)
    X_Bnm.copy_(G_Bnm)  # the one copy: cast and (for a tall G) transpose in a single pass
    X_Bnm = newton_schulz_(X_Bnm, steps, method, backend)
    if transposed:
        X_Bnm = X_Bnm.mT
    return X_Bnm if G.ndim == 3 else X_Bnm.squeeze(0)


def newton_schulz_(X_Bnm: Tensor, steps: int = 5, method: str = "keller", backend: str = "auto") -> Tensor:
    """The iteration itself, on a buffer the caller prepared and gives up.

    ``X_Bnm``: contiguous [B, n, m] with n <= m, in the compute dtype. It is normalised in
    place and then serves as scratch; the result (X_Bnm itself or another buffer of its
    shape) is returned. Optimizers fill such a buffer straight from their momentum (no
    intermediate update tensor, no batching copy) and read the result straight into the
    weights. ``newton_schulz`` is the copying wrapper for everyone else.
    """
    if X_Bnm.ndim != 3 or X_Bnm.size(-2) > X_Bnm.size(-1) or not X_Bnm.is_contiguous():
        raise ValueError(f"newton_schulz_: X must be a contiguous wide [B, n, m] batch (n <= m), got {tuple(X_Bnm.shape)}")
    safety = POLAR_EXPRESS_SAFETY if method == "polar_express" else 1.0
    norm_B11 = torch.linalg.vector_norm(X_Bnm, dim=(-2, -1), keepdim=True)
    X_Bnm.div_(norm_B11.mul_(safety).add_(NORM_EPS))
    coeffs = ns_coefficients(method, steps)
    n, m = X_Bnm.shape[-2:]
    if method == "gram" and n < m:
        return _gram_iterate(X_Bnm, coeffs)
    return _pick_iterate(X_Bnm, backend)(X_Bnm, coeffs)


def _check_args(G: Tensor, steps: int, method: str, dtype: torch.dtype, backend: str) -> None:
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz: G must be 2-D [n, m] or 3-D [B, n, m], got shape {tuple(G.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"newton_schulz: steps={steps!r} must be an int >= 1")
    if method not in NS_METHODS:
        raise ValueError(f"newton_schulz: method={method!r}; valid: {', '.join(NS_METHODS)}")
    if dtype not in _NS_DTYPES:
        raise ValueError(f"newton_schulz: dtype={dtype}; valid: bfloat16, float16, float32, float64")
    if backend not in NS_BACKENDS:
        raise ValueError(f"newton_schulz: backend={backend!r}; valid: {', '.join(NS_BACKENDS)}")
    if backend == "triton" and method == "gram":
        raise ValueError("newton_schulz: method='gram' has no Triton kernel; use backend='torch' or 'auto'")


IterateFn = Callable[[Tensor, Sequence[tuple[float, float, float]]], Tensor]
_triton_iterate: Optional[IterateFn] = None
_triton_import_error: Optional[BaseException] = None


def _load_triton() -> Optional[IterateFn]:
    """Import optim.triton_ns lazily, once; remember why it failed."""
    global _triton_iterate, _triton_import_error
    if _triton_iterate is None and _triton_import_error is None:
        try:
            from .triton_ns import ns_iterate_triton

            _triton_iterate = ns_iterate_triton
        except Exception as e:  # triton missing, no GPU driver, or the file not written yet
            _triton_import_error = e
    return _triton_iterate


def _pick_iterate(X_Bnm: Tensor, backend: str) -> IterateFn:
    if backend == "triton":
        fn = _load_triton()
        if fn is None:
            raise RuntimeError(
                f"newton_schulz: backend='triton' needs triton and optim.triton_ns.ns_iterate_triton "
                f"({type(_triton_import_error).__name__}: {_triton_import_error}); use backend='torch'"
            )
        return fn
    return _ns_iterate_torch  # "torch", and "auto" until a GPU run shows a shape range where Triton wins


def _ns_iterate_torch(
    X_Bnm: Tensor, coeffs: Sequence[tuple[float, float, float]], per_matrix: Optional[bool] = None
) -> Tensor:
    """Reference iteration: A = X X^T; B = b A + c A A; X = a X + B X per triple.

    The products write into buffers allocated once (X ping-pongs with Y), not a fresh tensor
    per product: on a CPU, tens of MB per product cost page faults. On a CPU the batch is
    walked matrix by matrix: a bf16 ``mm`` ran 3-10% faster than ``bmm`` over the same
    matrices (1 thread, 512 x 512 and 512 x 2048), and launches cost nothing there; on a GPU
    one batched call per product saves the launches (``per_matrix`` overrides the choice, for
    tests). (Folding ``a`` into B's diagonal would
    make the last product a plain matmul, ~14% cheaper on a CPU, but rounding a + B_ii to
    bf16 tripled the bf16 error against an fp32 trajectory:
    tests/optim/test_muon.py::test_matches_torch_muon_bf16.)
    """
    Bt, n, _ = X_Bnm.shape
    Y_Bnm = torch.empty_like(X_Bnm)
    if per_matrix if per_matrix is not None else X_Bnm.device.type == "cpu":
        A_nn, B_nn = X_Bnm.new_empty(n, n), X_Bnm.new_empty(n, n)
        for j in range(Bt):
            x, y = X_Bnm[j], Y_Bnm[j]
            for a, b, c in coeffs:
                torch.mm(x, x.mT, out=A_nn)  # A = X X^T
                torch.addmm(A_nn, A_nn, A_nn, beta=b, alpha=c, out=B_nn)  # B = b A + c A A
                torch.addmm(x, B_nn, x, beta=a, out=y)
                x, y = y, x
        return X_Bnm if len(coeffs) % 2 == 0 else Y_Bnm
    A_Bnn, B_Bnn = X_Bnm.new_empty(Bt, n, n), X_Bnm.new_empty(Bt, n, n)
    for a, b, c in coeffs:
        torch.bmm(X_Bnm, X_Bnm.mT, out=A_Bnn)
        torch.baddbmm(A_Bnn, A_Bnn, A_Bnn, beta=b, alpha=c, out=B_Bnn)
        torch.baddbmm(X_Bnm, B_Bnn, X_Bnm, beta=a, out=Y_Bnm)
        X_Bnm, Y_Bnm = Y_Bnm, X_Bnm
    return X_Bnm


def _gram_iterate(X_Bnm: Tensor, coeffs: Sequence[tuple[float, float, float]]) -> Tensor:
    """Same result as _ns_iterate_torch, iterating on R = X X^T (n x n) instead of X.
    On a CPU matrix by matrix, for the reason given there."""
    if X_Bnm.device.type == "cpu" and X_Bnm.shape[0] > 1:
        return torch.cat([_gram_iterate(X_Bnm[j : j + 1], coeffs) for j in range(X_Bnm.shape[0])])
    R_Bnn = X_Bnm @ X_Bnm.mT
    Q_Bnn: Optional[Tensor] = None  # None stands for the identity
    for i, (a, b, c) in enumerate(coeffs):
        if i == GRAM_RESTART_AFTER and Q_Bnn is not None:
            X_Bnm = Q_Bnn @ X_Bnm
            R_Bnn = X_Bnm @ X_Bnm.mT
            Q_Bnn = None
        P_Bnn = torch.baddbmm(R_Bnn, R_Bnn, R_Bnn, beta=b, alpha=c)
        P_Bnn.diagonal(dim1=-2, dim2=-1).add_(a)  # P = a I + b R + c R^2
        Q_Bnn = P_Bnn if Q_Bnn is None else P_Bnn @ Q_Bnn
        if i + 1 < len(coeffs):  # the last R is never used
            R_Bnn = P_Bnn @ R_Bnn @ P_Bnn  # X <- P X  =>  X X^T <- P R P (P symmetric)
    return Q_Bnn @ X_Bnm  # type: ignore[operator]


def ns_cost(n: int, m: int) -> int:
    """Relative cost of Newton-Schulz on one n x m matrix: s^2 (2l + s), s the short side and l
    the long one (one iteration's matmul FLOPs up to a constant). The one cost the owner plans
    of optim.distributed balance."""
    s, l = min(n, m), max(n, m)
    return s * s * (2 * l + s)


FillFn = Callable[[int, Any, Tensor], None]  # fill(i, key, out): write update i's block [key] into out
ApplyFn = Callable[[int, Any, Tensor], None]  # apply(i, key, O): consume the orthogonalised block [key]


def orthogonalize_local_(
    items: list[tuple[int, torch.Size, torch.device]],
    ns: Callable[[Tensor], Tensor],
    ns_dtype: torch.dtype,
    fill: FillFn,
    apply: ApplyFn,
) -> None:
    """NS of whole local matrices in as few batched calls as possible, copy-free.

    ``items``: (index, shape [n, m] or [E, n, m], device). Matrices are grouped by their wide
    orientation: an [n, m] and an [m, n] matrix (an MLP's up and down projections) share one
    batch buffer, the tall one filled and read through a transposed view of its slot.
    ``fill(i, (), out)`` writes item i's update into ``out`` (its shape, the NS dtype);
    ``ns(X)`` orthogonalises the buffer (which it may overwrite); ``apply(i, (), O)``
    consumes the result through a view of the output, again in item i's shape.
    """
    by_shape: dict[tuple[Any, ...], list[tuple[int, torch.Size]]] = defaultdict(list)
    for i, shape, device in items:
        n, m = shape[-2:]
        by_shape[(device, min(n, m), max(n, m))].append((i, shape))
    for (device, n, m), members in by_shape.items():
        counts = [math.prod(shape[:-2]) for _, shape in members]
        X_Bnm = torch.empty(sum(counts), n, m, dtype=ns_dtype, device=device)
        for (i, shape), v in zip(members, _slot_views(X_Bnm, members, counts)):
            fill(i, (), v)
        O_Bnm = ns(X_Bnm)
        for (i, shape), v in zip(members, _slot_views(O_Bnm, members, counts)):
            apply(i, (), v)


def _slot_views(X_Bnm: Tensor, members: list[tuple[int, torch.Size]], counts: list[int]) -> list[Tensor]:
    """Each member's slots of a wide batch buffer, viewed in the member's own shape."""
    views, start = [], 0
    for (_, shape), count in zip(members, counts):
        v = X_Bnm[start : start + count]
        v = v if shape[-2] == X_Bnm.shape[-2] else v.mT
        views.append(v if len(shape) == 3 else v[0])
        start += count
    return views
