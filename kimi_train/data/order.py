"""The global sample order: a seeded bijection per epoch, and the interleave of a mixture.

Both are pure functions of their arguments, so no index is stored anywhere and nothing per
rank grows with the corpus: `permute(i, n, seed, source, epoch)` is the window at position i of an
epoch's shuffle (a Feistel network on the next power of four >= n, cycle-walked into [0, n)),
and `interleave(counts, weights, k)` continues the mixture's schedule from any prefix.
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 4


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a good 64-bit hash, vectorised (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, *key: int) -> np.ndarray:
    """Positions ``index`` (each in [0, n)) of a pseudo-random permutation of range(n), keyed by the
    integers ``key`` (e.g. seed, source, epoch): another key, another permutation."""
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)  # 2 * half bits cover n
    mask = np.uint64((1 << half) - 1)
    x = np.asarray(index, dtype=np.uint64).copy()
    todo = np.ones(len(x), dtype=bool)
    with np.errstate(over="ignore"):
        h = np.uint64(0x243F6A8885A308D3)
        for k in key:
            h = _mix64(h ^ np.uint64(k & 0xFFFFFFFFFFFFFFFF))
        keys = _mix64(h + np.arange(1, _ROUNDS + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        while todo.any():  # cycle-walking: re-encrypt the values that fell outside [0, n)
            v = x[todo]
            left, right = v >> np.uint64(half), v & mask
            for k in keys:
                left, right = right, left ^ (_mix64(right ^ k) & mask)
            x[todo] = (left << np.uint64(half)) | right
            todo = x >= np.uint64(n)
    return x.astype(np.int64)


def interleave(counts: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """The sources of the next ``k`` samples, given ``counts`` already drawn per source (updated in place).

    Earliest deadline first: sample n (1-based, over the whole run) goes, among the sources not
    ahead of their target share (count < w * n), to the one whose next sample is due first
    ((count + 1) / w, ties to the lower index). With the shares summing to one this schedule is
    feasible, so every prefix of every source stays within one sample of w * n. Megatron's
    BlendedDataset rule (argmax of w * n - count) does not: over 300 random 2-6 source mixtures
    it lagged by up to 1.12 samples.
    """
    if len(counts) == 1:  # one source: nothing to decide (and no per-sample loop)
        counts[0] += k
        return np.zeros(k, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    out = np.empty(k, dtype=np.int64)
    n = int(counts.sum())
    for j in range(k):
        n += 1
        due = np.where(counts < w * n, (counts + 1) / w, np.inf)
        s = int(np.argmin(due))
        counts[s] += 1
        out[j] = s
    return out
