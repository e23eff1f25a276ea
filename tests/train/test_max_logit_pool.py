"""MaxLogitPool (QK-Clip's re-measure pool) on its own: what it keeps, and its checkpoint state."""

import numpy as np
import pytest
import torch

from kimi_train.max_logit_pool import MaxLogitPool


def rows(*firsts, T1=4):
    """Token rows [len(firsts), T1] told apart by their first token."""
    out = torch.zeros(len(firsts), T1, dtype=torch.long)
    out[:, 0] = torch.tensor(firsts)
    return out


def test_keeps_each_heads_top_sequences_and_measures_each_distinct_row_once():
    pool = MaxLogitPool(per_head=2)
    batch = rows(10, 11, 12, 13)
    assert torch.equal(pool.candidates(batch), batch)  # empty pool: the batch
    # [N=4, layers=2, heads=1]: layer 0 peaks on rows 11 then 13, layer 1 on row 11 then 10
    pool.update(batch, torch.tensor([[[1.0], [5.0]], [[9.0], [7.0]], [[0.0], [0.0]], [[3.0], [1.0]]]))
    assert sorted(pool.sequences[:, 0].tolist()) == [10, 11, 13] and len(pool) == 3
    # the pool comes first; a batch row equal to a pooled one (or to another batch row) is measured once
    cands = pool.candidates(rows(13, 20, 20))
    assert cands[:, 0].tolist() == [10, 11, 13, 20]
    # the new batch beats row 10 on layer 1 and row 13 on layer 0: they leave
    pool.update(cands, torch.tensor([[[1.0], [2.0]], [[9.0], [7.0]], [[3.0], [1.0]], [[4.0], [8.0]]]))
    assert sorted(pool.sequences[:, 0].tolist()) == [11, 20]


def test_state_round_trip_and_a_new_sequence_length_drops_the_pool():
    pool = MaxLogitPool(per_head=1)
    assert pool.state_dict().shape == (0, 0)
    batch = rows(1, 2)
    pool.update(batch, torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    state = pool.state_dict()
    assert state.dtype == np.int64 and state.shape == (2, 4)
    again = MaxLogitPool(per_head=1)
    again.load_state_dict(state)
    assert torch.equal(again.sequences, pool.sequences)
    again.load_state_dict(np.zeros((0, 0), dtype=np.int64))
    assert again.sequences is None
    longer = rows(7, T1=6)
    assert torch.equal(pool.candidates(longer), longer)
    with pytest.raises(ValueError, match="integer array"):
        again.load_state_dict(np.zeros((2, 3), dtype=np.float32))


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_per_head_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=f"per_head={bad!r}"):
        MaxLogitPool(bad)


def test_update_checks_the_shapes_agree():
    with pytest.raises(ValueError, match="3 candidates but max logits for 2"):
        MaxLogitPool(1).update(rows(1, 2, 3), torch.zeros(2, 1, 1))
