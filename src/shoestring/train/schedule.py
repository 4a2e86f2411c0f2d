"""Learning-rate schedule: linear warmup, then cosine decay to `min_lr_ratio * lr`.

A pure function of the step, so a resumed run gets exactly the LR an uninterrupted one would.
The warmup part does not depend on `total_steps`: a run whose length is decided during warm-up
(`train.budget`, shoestring.train.budget) trains on the same LRs before and after deciding.
The decay reaches its floor at step `total_steps`, one past the last step run (as in Hugging
Face's cosine schedule): the last step runs a sliver above it.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
