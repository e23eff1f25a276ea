"""The activation counter counts exactly what autograd keeps, and what checkpointing keeps."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kimi_train.memory.counter import count_activations


class _Block(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.lin = nn.Linear(d, 4 * d, bias=False)

    def forward(self, x):
        h = self.lin(x)          # saves x (mm's input); the weight is a parameter
        return torch.tanh(h).sum(-1)   # tanh saves its output; sum saves nothing


def test_counts_exactly_what_autograd_saves():
    block, x = _Block(), torch.randn(8, 16)
    count = count_activations(block, x)
    # x (8 x 16, cloned inside the counter, saved by mm) + tanh's output (8 x 64), fp32
    assert count.bytes == 4 * (8 * 16 + 8 * 64)
    assert set(count.by_op()) == {"clone", "tanh"}


def test_no_grad_keeps_nothing_and_parameters_never_count():
    block, x = _Block(), torch.randn(8, 16)
    with torch.no_grad():
        assert count_activations(block, x).bytes == 0
    # A parameter used as the input is not an activation.
    assert count_activations(lambda w: (w * w).sum(), block.lin.weight, module=block).bytes == 0


def test_sees_what_checkpoint_keeps():
    block, x = _Block(), torch.randn(8, 16)
    count = count_activations(lambda x: checkpoint(block, x, use_reentrant=False), x, module=block)
    assert count.bytes == 4 * 8 * 16  # only the region's input


def test_a_view_of_a_storage_from_before_the_forward_is_not_counted():
    """Index's backward keeps its indices: here a view of the caller's (integer, uncloned) tensor."""
    block, ids = _Block(), torch.randint(0, 64, (4, 8))
    count = count_activations(lambda w, i: w[i.flatten()].sum(), block.lin.weight, ids, module=block)
    assert count.bytes == 0, count.storages
