"""ImageNet-style data source: an ImageFolder tree decoded and augmented by DataLoader worker processes."""
import logging
import os
from typing import Iterator, List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from configs.errors import UserError
from data.info import DatasetInfo
from data.sampling import STREAM_EPOCH, check_rank, contiguous_range, generator, rank_positions, split_indices
from data.sources import Batch, DataSource

logger = logging.getLogger(__name__)


def imagenet_roots(data_dir: str) -> List[str]:
    """Directories searched, in order, for train/ and val/ subfolders."""
    return [data_dir, os.path.join(data_dir, "imagenet"), os.path.join(data_dir, "ImageNet")]


def find_imagenet_root(data_dir: str) -> str:
    looked = imagenet_roots(data_dir)
    for root in looked:
        if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
            return root
    raise UserError(f"imagenet not found: no train/ and val/ ImageFolder trees in {' or '.join(looked)}; "
                    "pass --data-dir DIR (ImageNet cannot be downloaded automatically)")


def _image_folder(path: str):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(path)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"cannot use {path} as an ImageFolder tree: {e}")


def train_transform(image_dim: int):
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(image_dim), T.RandomHorizontalFlip(), T.ToTensor()])


def test_transform(image_dim: int):
    from torchvision import transforms as T

    return T.Compose([T.Resize(int(image_dim * 256 / 224)), T.CenterCrop(image_dim), T.ToTensor()])


class _View(Dataset):
    """Selected samples of an ImageFolder with a transform.

    An item is either an index, or an (index, seed) pair: then the transform's random draws (torchvision
    transforms use torch's global generator) come from that seed, so a training image's augmentation is a
    function of (run seed, epoch, position) alone, whatever the number of workers. The caller's global
    RNG state is restored afterwards.
    """

    def __init__(self, folder, indices: Sequence[int], transform):
        self.folder = folder
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            i, seed = item
            img, target = self.folder[self.indices[i]]
            state = torch.get_rng_state()
            try:
                torch.manual_seed(seed)
                x = self.transform(img)
            finally:
                torch.set_rng_state(state)
        else:
            img, target = self.folder[self.indices[item]]
            x = self.transform(img)
        return x, target


def interleave_classes(targets: Sequence[int]) -> List[int]:
    """A fixed test order that cycles through the classes (first image of every class, then the second...).

    ImageFolder lists images class by class, so the first ``limit`` images (``--n-examples``) would
    cover only a few classes; in this order any prefix is as class-balanced as the folder allows.
    """
    seen: dict = {}
    keys = []
    for i, t in enumerate(targets):
        k = seen.get(t, 0)
        seen[t] = k + 1
        keys.append((k, t, i))
    return [i for _, _, i in sorted(keys)]


class FolderSource(DataSource):
    """``{root}/train/<class>/*`` for training, ``{root}/val/<class>/*`` as the test set.

    The test order is fixed and interleaves the classes (see ``interleave_classes``), so that a ``limit``
    takes a class-balanced prefix.

    ``info.num_classes`` is the number of class folders found under train/ (dataset_info('imagenet')
    says 1000 without looking).
    """

    def __init__(self, info: DatasetInfo, data_dir: str, *, data_fraction: float = 1.0, val_split: float = 0.0,
                 seed: int = 0, workers: Optional[int] = None):
        root = find_imagenet_root(data_dir)
        train = _image_folder(os.path.join(root, "train"))
        test = _image_folder(os.path.join(root, "val"))
        _align_classes(train, test, os.path.join(root, "val"))
        self.info = DatasetInfo(info.name, len(train.classes), info.in_channels, info.image_size, info.mean, info.std)
        self.device = torch.device("cpu")
        self.workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)
        if self.workers < 0:
            raise UserError(f"workers must be 0 or more, got {self.workers}")
        train_idx, val_idx = split_indices(len(train), data_fraction, val_split, seed)
        size = info.image_size
        self._train = _View(train, train_idx.tolist(), train_transform(size))
        self._val = _View(train, val_idx.tolist(), test_transform(size))
        order = interleave_classes(test.targets)
        self._test = _View(test, order, test_transform(size))
        self._test_targets = torch.tensor(test.targets, dtype=torch.int64)[order]
        self.num_train, self.num_val, self.num_test = len(self._train), len(self._val), len(self._test)
        logger.info("%s from %s: %d classes, %d train, %d val, %d test images at %dx%d, %d workers", info.name,
                    root, self.info.num_classes, self.num_train, self.num_val, self.num_test, size, size,
                    self.workers)

    def to(self, device) -> "FolderSource":
        self.device = torch.device(device)
        return self

    def _loader(self, dataset: Dataset, items: list, batch_size: int) -> Iterator[Batch]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        # The loader draws its workers' base seed from ``generator``; giving it one keeps the caller's
        # global RNG untouched (the transforms are seeded per item anyway, see _View).
        loader = DataLoader(dataset, batch_size=batch_size, sampler=items, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(0))
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_batches(self, batch_size: int, *, epoch: int, seed: int, rank: int = 0,
                      world_size: int = 1) -> Iterator[Batch]:
        check_rank(rank, world_size)
        # Drawn identically on every rank: the permutation, then one transform seed per position.
        g = generator(STREAM_EPOCH, seed, epoch)
        order = torch.randperm(self.num_train, generator=g)
        seeds = torch.randint(0, 2 ** 62, (self.num_train,), generator=g)
        mine = rank_positions(self.num_train, rank, world_size)
        items = list(zip(order[mine].tolist(), seeds[mine].tolist()))
        return self._loader(self._train, items, batch_size)

    def test_batches(self, batch_size: int, *, limit: Optional[int] = None, rank: int = 0,
                     world_size: int = 1) -> Iterator[Batch]:
        start, end = contiguous_range(self.test_count(limit), rank, world_size)
        return self._loader(self._test, list(range(start, end)), batch_size)

    def val_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        self._require_val()
        start, end = contiguous_range(self.num_val, rank, world_size)
        return self._loader(self._val, list(range(start, end)), batch_size)

    def test_labels(self, limit: Optional[int] = None) -> Tensor:
        return self._test_targets[:self.test_count(limit)].clone()


def _align_classes(train, test, test_path: str) -> None:
    """Give the test folder the training folder's class indices (val/ may lack some classes)."""
    if test.classes == train.classes:
        return
    unknown = sorted(set(test.classes) - set(train.classes))
    if unknown:
        raise UserError(f"{test_path} has class folders that train/ lacks: {', '.join(unknown[:5])}"
                        + (" ..." if len(unknown) > 5 else ""))
    remap = [train.class_to_idx[c] for c in test.classes]
    test.samples = [(p, remap[t]) for p, t in test.samples]
    test.imgs = test.samples
    test.targets = [t for _, t in test.samples]
    test.classes = list(train.classes)
    test.class_to_idx = dict(train.class_to_idx)
