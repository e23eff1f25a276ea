"""Activation memory: a counter of what a forward keeps for its backward (``counter``)."""
