"""Statistics are taken once per forward, whatever recomputes it.

The attention layers record their per-head max logits (QK-Clip's input) and the MoE layers count
their routed tokens (the expert-bias update's input and the logged expert load) during training
forwards. Activation checkpointing runs a layer's forward a second time inside the backward; that
run happens inside ``recomputing()`` and records nothing, so the statistics are those of one forward.

The recording itself adds no op to the forward: a record is a Python append of a tensor the forward
computes anyway (folded when read). A recomputation must replay the forward's ops one for one
(torch's selective checkpointing looks its saved outputs up by op and call index), so a record
taken conditionally with tensor ops would shift that lookup.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

_depth = 0  # plain global (not a ContextVar): the backward's recomputation may run on another thread


@contextmanager
def recomputing() -> Iterator[None]:
    """Run a forward again for the backward: it records no statistics."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def is_recomputing() -> bool:
    return _depth > 0


__all__ = ["recomputing", "is_recomputing"]
