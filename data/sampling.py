"""Deterministic index bookkeeping shared by both data sources.

Every random choice is drawn from a ``torch.Generator`` whose seed is derived from (purpose, run seed,
epoch) only, so the subset, the validation split and each epoch's order are the same whether a run is
fresh or resumed, and the same on every rank.
"""
import math
from typing import Tuple

import numpy as np
import torch

from configs.errors import UserError

# Purposes, so that the same run seed gives unrelated streams for unrelated choices.
STREAM_SUBSET = 1
STREAM_VAL = 2
STREAM_EPOCH = 3


def derive_seed(stream: int, seed: int, epoch: int = 0) -> int:
    """A well-mixed 64-bit seed from small integers (numpy's SeedSequence does the hashing)."""
    words = [int(stream) % (1 << 64), int(seed) % (1 << 64), int(epoch) % (1 << 64)]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])


def generator(stream: int, seed: int, epoch: int = 0) -> torch.Generator:
    """A CPU generator seeded from (stream, seed, epoch)."""
    g = torch.Generator()
    g.manual_seed(derive_seed(stream, seed, epoch))
    return g


def split_indices(n: int, data_fraction: float, val_split: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pick the training subset and the held-out validation split of a training set of ``n`` examples.

    Returns sorted int64 index tensors (train, val); val is empty when ``val_split`` is 0.
    The subset has ``int(data_fraction * n)`` examples; the validation split takes ``int(val_split * m)``
    of those ``m``.
    """
    data_fraction = float(data_fraction)
    val_split = float(val_split)
    if not 0.0 < data_fraction <= 1.0:
        raise UserError(f"data_fraction must be in (0, 1], got {data_fraction}")
    if not 0.0 <= val_split < 1.0:
        raise UserError(f"val_split must be in [0, 1), got {val_split}")
    m = int(data_fraction * n)
    if m < 1:
        raise UserError(f"data_fraction {data_fraction} of {n} training examples leaves none; use a larger fraction")
    if m == n:
        pool = torch.arange(n)
    else:
        pool = torch.randperm(n, generator=generator(STREAM_SUBSET, seed))[:m].sort().values
    if val_split == 0.0:
        return pool, pool[:0]
    n_val = int(val_split * m)
    if n_val < 1 or n_val >= m:
        raise UserError(
            f"val_split {val_split} of {m} training examples gives {n_val} validation examples; "
            f"choose a split that leaves at least one example on each side"
        )
    order = torch.randperm(m, generator=generator(STREAM_VAL, seed))
    val = pool[order[:n_val]].sort().values
    train = pool[order[n_val:]].sort().values
    return train, val


def padded_length(n: int, world_size: int) -> int:
    """Length of an epoch's permutation after wrapping it so every rank gets the same count."""
    return int(math.ceil(n / world_size)) * world_size


def rank_positions(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Which positions of an epoch's permutation of ``n`` items ``rank`` iterates over.

    The permutation is wrapped (repeating from its start) to a multiple of world_size, and rank takes
    every world_size-th position of it starting at ``rank``; the result is taken modulo n, so it indexes
    the unwrapped permutation (and anything else drawn per position, such as augmentation parameters).
    """
    check_rank(rank, world_size)
    return torch.arange(rank, padded_length(n, world_size), world_size) % n


def contiguous_range(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """[start, end) of rank's contiguous slice of n items; the first n % world_size ranks get one more."""
    check_rank(rank, world_size)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def count_batches(n: int, batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return (n + batch_size - 1) // batch_size
