"""The tests' name for the one spawner, kimi_train.parallel.spawn (tests/distributed is on sys.path)."""

from kimi_train.parallel.spawn import spawn

__all__ = ["spawn"]
