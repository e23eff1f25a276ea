"""QK-Clip's re-measure pool: for each attention head, the sequences that gave it its highest logits.

With ``optim.qk_clip.remeasure`` the step clips with the max logits of the updated weights on the
step's own batch, so a clipped head leaves the step at exactly tau *on that batch*. The next
batch's maximum is another sample: at laptop scale (a few thousand tokens a step) it is up to a
third higher for the same weights (docs/stability.md). A batch a thousand times larger would
make the maximum stable; the pool gets most of the way for the price of a few more no-grad
sequences. It keeps, for every head, the ``per_head`` sequences with the highest logits among
all those seen so far, and the re-measure runs them together with the step's batch, under the
current weights. A clip then holds for the rarest patterns seen, not only for this batch's.

The pool is per rank (each rank keeps the extremes of its own data shard; MuonClip takes the
max over ranks), at most ``per_head * layers * heads`` sequences, somewhat fewer when one
sequence is among the top of several heads. That bound grows with the model (15,616 sequences
for per_head 4 on K2's 61 x 64 heads), so the pool is meant for small models and small batches.
It is saved with each checkpoint, so a resumed run clips exactly as the uninterrupted one.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Optional

import numpy as np
import torch


class MaxLogitPool:
    """The ``per_head`` highest-logit sequences of every head, as token-id rows [P, T+1] on the CPU."""

    def __init__(self, per_head: int):
        if isinstance(per_head, bool) or not (isinstance(per_head, int) and per_head >= 1):
            raise ValueError(f"MaxLogitPool: per_head={per_head!r} must be an int >= 1")
        self.per_head = per_head
        self.sequences: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return 0 if self.sequences is None else len(self.sequences)

    def candidates(self, batch_NT1: torch.Tensor) -> torch.Tensor:
        """The pool followed by this step's sequences, each distinct sequence once.

        A pool of another sequence length (a resumed run with a new train.seq_len) is dropped.
        """
        batch_NT1 = batch_NT1.detach().cpu()
        if self.sequences is None or self.sequences.shape[1] != batch_NT1.shape[1]:
            rows = batch_NT1
        else:
            rows = torch.cat([self.sequences, batch_NT1])
        # first occurrence of each distinct row, in order (a pooled sequence drawn again, or a
        # repeated window of a small corpus, is measured once)
        _, inverse = torch.unique(rows, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), len(rows), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(len(rows)), reduce="amin")
        return rows[first.sort().values]

    def update(self, candidates_NT1: torch.Tensor, max_logits_NLH: torch.Tensor) -> None:
        """Keep, for every (layer, head), the ``per_head`` candidates with its highest max logit."""
        if candidates_NT1.shape[0] != max_logits_NLH.shape[0]:
            raise ValueError(f"MaxLogitPool.update: {candidates_NT1.shape[0]} candidates but max logits for "
                             f"{max_logits_NLH.shape[0]}")
        scores_NX = max_logits_NLH.detach().float().cpu().flatten(1)
        top_KX = scores_NX.topk(min(self.per_head, len(scores_NX)), dim=0).indices
        self.sequences = candidates_NT1[torch.unique(top_KX)].clone()

    def state_dict(self) -> np.ndarray:
        """The pool as an int64 array [P, T+1] (empty: shape [0, 0]), for the checkpoint."""
        if self.sequences is None:
            return np.zeros((0, 0), dtype=np.int64)
        return self.sequences.numpy().astype(np.int64)

    def load_state_dict(self, array: Optional[np.ndarray]) -> None:
        if array is None or array.size == 0:
            self.sequences = None
            return
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"MaxLogitPool.load_state_dict: expected an integer array [P, T+1], got "
                             f"{array.dtype} {array.shape}")
        self.sequences = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))


def measure_in_chunks(model: torch.nn.Module, rows_NT1: torch.Tensor, chunk: int, device: torch.device,
                      per_sequence: bool = False, forwards: Optional[int] = None,
                      autocast: Callable[[], ContextManager] = nullcontext) -> Optional[torch.Tensor]:
    """``model.measure_max_logits`` over token rows [N, T+1] (inputs: all but the last token),
    ``chunk`` rows per no-grad forward. Returns the per-sequence max logits [N, layers, heads]
    with ``per_sequence``, else None (the attention layers' records hold the max either way).

    forwards: run this many forwards (>= the chunks needed; the extra ones repeat the first rows,
    which leaves the max unchanged), so that ranks with different row counts run as many
    collective forwards (FSDP all-gathers, EP all-to-alls).
    """
    needed = -(-len(rows_NT1) // chunk)
    forwards = needed if forwards is None else forwards
    if forwards < needed:
        raise ValueError(f"measure_in_chunks: forwards={forwards} < the {needed} chunks of {len(rows_NT1)} rows")
    per = []
    for i in range(forwards):
        extra = i >= needed
        rows = rows_NT1[:chunk] if extra else rows_NT1[i * chunk:(i + 1) * chunk]
        with autocast():
            out = model.measure_max_logits(rows[:, :-1].to(device, non_blocking=True),
                                           per_sequence=per_sequence and not extra)
        if out is not None:
            per.append(out)
    return torch.cat(per) if per_sequence else None
