"""In-memory data source for the small datasets: uint8 tensors on the device, augmented there per batch."""
import logging
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from data.augment import CROP_FLIP_PADDING, crop_flip, draw_crop_flip
from data.info import DatasetInfo
from data.sampling import STREAM_EPOCH, check_rank, contiguous_range, generator, rank_positions, split_indices
from data.sources import Batch, DataSource

logger = logging.getLogger(__name__)


def _to_float(x: Tensor) -> Tensor:
    return x.float().div_(255.0)


class TensorSource(DataSource):
    """Whole dataset as uint8 [N, C, H, W] tensors; ``to(device)`` moves them once."""

    def __init__(self, info: DatasetInfo, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, data_fraction: float = 1.0, val_split: float = 0.0, seed: int = 0):
        self.info = info
        self.device = torch.device("cpu")
        self.padding = CROP_FLIP_PADDING[info.name]
        full_x = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.uint8))
        full_y = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
        train_idx, val_idx = split_indices(len(full_y), data_fraction, val_split, seed)
        if len(train_idx) == len(full_y):
            self._train_x, self._train_y = full_x, full_y
        else:
            self._train_x, self._train_y = full_x[train_idx], full_y[train_idx]
        self._val_x, self._val_y = full_x[val_idx], full_y[val_idx]
        self._test_x = torch.from_numpy(np.ascontiguousarray(test_x, dtype=np.uint8))
        self._test_y = torch.from_numpy(np.asarray(test_y, dtype=np.int64))
        self.num_train = len(self._train_y)
        self.num_val = len(self._val_y)
        self.num_test = len(self._test_y)
        logger.info("%s: %d train, %d val, %d test images of %s", info.name, self.num_train, self.num_val,
                    self.num_test, tuple(self._test_x.shape[1:]))

    def to(self, device) -> "TensorSource":
        device = torch.device(device)
        if device != self.device:
            for attr in ("_train_x", "_train_y", "_val_x", "_val_y", "_test_x", "_test_y"):
                setattr(self, attr, getattr(self, attr).to(device))
            self.device = device
        return self

    def train_batches(self, batch_size: int, *, epoch: int, seed: int, rank: int = 0,
                      world_size: int = 1) -> Iterator[Batch]:
        check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        # Drawn identically on every rank: the permutation, then one crop/flip per position, so what an
        # example looks like in an epoch does not depend on rank or world_size.
        g = generator(STREAM_EPOCH, seed, epoch)
        order = torch.randperm(self.num_train, generator=g)
        mine = rank_positions(self.num_train, rank, world_size)
        offsets = flips = None
        if self.padding:
            offsets, flips = draw_crop_flip(self.num_train, self.padding, g)
            offsets, flips = offsets[mine].to(self.device), flips[mine].to(self.device)
        return self._train_iter(order[mine].to(self.device), offsets, flips, batch_size)

    def _train_iter(self, idx: Tensor, offsets: Optional[Tensor], flips: Optional[Tensor],
                    batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(idx), batch_size):
            b = idx[start:start + batch_size]
            x = self._train_x[b]
            if offsets is not None:
                x = crop_flip(x, offsets[start:start + batch_size], flips[start:start + batch_size], self.padding)
            yield _to_float(x), self._train_y[b]

    def test_batches(self, batch_size: int, *, limit: Optional[int] = None, rank: int = 0,
                     world_size: int = 1) -> Iterator[Batch]:
        start, end = contiguous_range(self.test_count(limit), rank, world_size)
        return _slices(self._test_x, self._test_y, start, end, batch_size)

    def val_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        self._require_val()
        start, end = contiguous_range(self.num_val, rank, world_size)
        return _slices(self._val_x, self._val_y, start, end, batch_size)

    def test_labels(self, limit: Optional[int] = None) -> Tensor:
        return self._test_y[:self.test_count(limit)].cpu().clone()


def _slices(x: Tensor, y: Tensor, start: int, end: int, batch_size: int) -> Iterator[Batch]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for s in range(start, end, batch_size):
        e = min(s + batch_size, end)
        yield _to_float(x[s:e]), y[s:e]
