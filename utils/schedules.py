"""Per-epoch learning-rate schedules of the original (the original HARP code's adjust_learning_rate), as pure functions.

The cosine schedule keeps the original's "-1" offset on purpose (README "Differences from the original code"): epochs 0 and 2 get the
same lr, epoch 1 the full lr, and the last epoch a small positive lr. With a single epoch (epochs = 1) the
only lr is 0; train.py warns about it.
"""
import math


def lr_at_epoch(epoch: int, *, lr: float, epochs: int, schedule: str, warmup_epochs: int = 0,
                warmup_lr: float = 0.1) -> float:
    """Learning rate for 0-based `epoch` of a run with `epochs` epochs after `warmup_epochs` of warm-up."""
    if epoch < warmup_epochs:
        return warmup_lr
    e = epoch - warmup_epochs
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (e - 1) / epochs))
    if schedule == "step":
        if e < 0.75 * epochs:
            return lr
        if e < 0.9 * epochs:
            return lr * 0.1
        if e < epochs:
            return lr * 0.01
        return lr * 0.001
    if schedule == "constant":
        return lr
    raise ValueError(f"unknown lr schedule {schedule!r}")
