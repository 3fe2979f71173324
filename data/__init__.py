"""Layer 2: datasets.

``build_data(name, data_dir=...)`` returns a ``DataSource``: the small datasets (CIFAR10, CIFAR100, SVHN,
MNIST, digits) as in-memory uint8 tensors augmented on the device (data/memory.py), ImageNet as an
ImageFolder tree read by DataLoader workers (data/folder.py). Readers for the official on-disk formats are
in data/formats.py; the batching contract is documented in data/sources.py.
"""
from typing import Optional

from data.folder import FolderSource
from data.formats import load_arrays
from data.info import DatasetInfo, canonical_dataset_name, dataset_info, dataset_names
from data.memory import TensorSource
from data.sources import DataSource

__all__ = [
    "DatasetInfo", "DataSource", "TensorSource", "FolderSource",
    "dataset_names", "canonical_dataset_name", "dataset_info", "build_data",
]


def build_data(name: str, *, data_dir: str, data_fraction: float = 1.0, download: bool = False, seed: int = 0,
               image_dim: Optional[int] = None, workers: Optional[int] = None,
               val_split: float = 0.0) -> DataSource:
    """Load a dataset into a ``DataSource`` (on the CPU; call ``.to(device)``).

    - ``data_fraction``: train on a random ``int(data_fraction * N)`` subset, drawn once from ``seed``.
    - ``val_split``: hold out that fraction of the (subset of the) training set, drawn from ``seed``, as a
      validation split without augmentation.
    - ``download``: fetch CIFAR10/CIFAR100/SVHN/MNIST into ``data_dir`` when they are not found there.
    - ``image_dim``, ``workers``: ImageNet only (input side, default 224; DataLoader workers, default
      min(8, cpu count)).
    - digits ignores ``data_dir`` (scikit-learn bundles it) and uses a fixed train/test split.
    """
    info = dataset_info(name, image_dim)
    if info.name == "imagenet":
        return FolderSource(info, str(data_dir), data_fraction=data_fraction, val_split=val_split, seed=seed,
                            workers=workers)
    train_x, train_y, test_x, test_y = load_arrays(info.name, str(data_dir), download)
    return TensorSource(info, train_x, train_y, test_x, test_y, data_fraction=data_fraction,
                        val_split=val_split, seed=seed)
