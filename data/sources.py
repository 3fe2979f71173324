"""The ``DataSource`` interface that trainers and evaluation iterate over.

Two implementations: ``TensorSource`` (data/memory.py; whole dataset as uint8 tensors on the device,
augmented there) and ``FolderSource`` (data/folder.py; an ImageFolder tree read by DataLoader workers).

Batches are ``(x, y)``: x float32 in [0, 1], NCHW, on the source's device; y int64 on the same device.

- Train order: a fresh permutation per epoch from a generator seeded by (seed, epoch), so epoch e is the
  same batches whether or not the run was resumed. Under ``world_size > 1`` the permutation is wrapped to
  a multiple of world_size and rank r takes positions r, r + world_size, ...; every rank gets the same
  number of examples and batches. The last batch of an epoch may be smaller than ``batch_size``.
- Test and validation order is fixed (the official file order for the small datasets; imagenet's val/
  interleaves its classes so that a ``limit`` prefix is balanced). ``rank``/``world_size`` split them into
  contiguous slices (sizes differ by at most one; nothing is padded, so no example is counted twice).
"""
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from data.info import DatasetInfo
from data.sampling import contiguous_range, count_batches, padded_length

Batch = Tuple[Tensor, Tensor]


class DataSource:
    info: DatasetInfo
    num_train: int
    num_test: int
    num_val: int  # 0 unless built with val_split > 0
    device: torch.device

    def to(self, device) -> "DataSource":
        raise NotImplementedError

    def train_batches(self, batch_size: int, *, epoch: int, seed: int, rank: int = 0,
                      world_size: int = 1) -> Iterator[Batch]:
        raise NotImplementedError

    def test_batches(self, batch_size: int, *, limit: Optional[int] = None, rank: int = 0,
                     world_size: int = 1) -> Iterator[Batch]:
        raise NotImplementedError

    def val_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        raise NotImplementedError

    def test_labels(self, limit: Optional[int] = None) -> Tensor:
        """Test labels (int64, on the CPU) in the order test_batches yields them, over all ranks."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared bookkeeping

    def test_count(self, limit: Optional[int] = None) -> int:
        """How many test examples ``limit`` selects (the first ``limit`` in test order)."""
        if limit is None:
            return self.num_test
        if limit < 0:
            raise ValueError(f"limit must be non-negative, got {limit}")
        return min(int(limit), self.num_test)

    def num_batches(self, split: str, batch_size: int, *, limit: Optional[int] = None,
                    world_size: int = 1) -> int:
        """Batches one rank iterates over (for progress bars). For test/val, the largest rank's count."""
        if split == "train":
            n = padded_length(self.num_train, world_size) // world_size
        elif split == "test":
            start, end = contiguous_range(self.test_count(limit), 0, world_size)
            n = end - start
        elif split == "val":
            start, end = contiguous_range(self.num_val, 0, world_size)
            n = end - start
        else:
            raise ValueError(f"split must be 'train', 'test' or 'val', got {split!r}")
        return count_batches(n, batch_size)

    def _require_val(self) -> None:
        if self.num_val == 0:
            raise ValueError("this data source has no validation split; build it with val_split > 0")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.info.name}, train={self.num_train}, val={self.num_val}, "
                f"test={self.num_test}, device={self.device})")
