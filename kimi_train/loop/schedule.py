"""Learning-rate schedules: warmup, then WSD (warmup-stable-decay), cosine or constant.

All schedules are a pure function of the step, returning a multiplier of the peak lr
(so a resumed run needs no schedule state beyond the step itself):

    warmup:   m(s) = (s + 1) / W                                  for s < W
    wsd:      m(s) = 1                                            for W <= s < S - D
              m(s) = r + (1 - r) * shape((s - (S - D)) / D)        for s >= S - D
    cosine:   m(s) = r + (1 - r) * shape_cos((s - W) / (S - W))    for s >= W
    constant: m(s) = 1                                            for s >= W

with S total steps, W warmup steps, D = round(decay_fraction * S) decay steps,
r = min_lr_ratio, and shape(p) = (1 + cos(pi p)) / 2 (cosine) or 1 - p (linear),
p in [0, 1]. WSD is what Kimi K2 used (constant lr, then a decay at the end); it also
lets a run be extended from a stable-phase checkpoint. Steps s are 0-based.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kimi_train.config import DECAY_SHAPES, SCHEDULE_TYPES


def _decay_shape(progress: float, shape: str) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


@dataclass
class LRSchedule:
    """Maps a 0-based optimizer step to a multiplier of the peak learning rate."""

    total_steps: int
    warmup_steps: int = 0
    type: str = "wsd"
    decay_fraction: float = 0.2
    decay_shape: str = "cosine"
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.type not in SCHEDULE_TYPES:
            raise ValueError(f"schedule.type={self.type!r} is not one of {', '.join(SCHEDULE_TYPES)}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"schedule.decay_shape={self.decay_shape!r} is not one of {', '.join(DECAY_SHAPES)}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        r = self.min_lr_ratio
        if self.type == "constant":
            return 1.0
        if self.type == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            return r + (1.0 - r) * _decay_shape((step - self.warmup_steps) / span, "cosine")
        decay_steps = round(self.decay_fraction * self.total_steps)
        decay_start = self.total_steps - decay_steps
        if decay_steps == 0 or step < decay_start:
            return 1.0
        # The last step (s = S - 1) reaches r exactly.
        progress = (step - decay_start + 1) / decay_steps
        return r + (1.0 - r) * _decay_shape(progress, self.decay_shape)
