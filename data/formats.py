"""Readers for the official on-disk formats of the small datasets, and the optional downloader.

Each reader returns ``(train_x, train_y, test_x, test_y)``: images as uint8 numpy arrays [N, C, H, W],
labels as int64 numpy arrays [N]. torchvision's dataset classes are used only to download (they check the
MD5 sums of the official files, which synthetic test fixtures cannot pass), never to read.
"""
import gzip
import logging
import os
import pickle
import struct
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from configs.errors import UserError

logger = logging.getLogger(__name__)

Arrays = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

_CIFAR = {
    # name: (folder, train files, test files, label key, classes)
    "CIFAR10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "CIFAR100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}
_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


# ----------------------------------------------------------------------------------------- locating


class DatasetNotFound(UserError):
    """The dataset's files are not where the reader looks (as opposed to present but unreadable)."""


def _missing_error(name: str, looked: Sequence[str], files: Sequence[str], downloadable: bool,
                   exists: Callable[[str, str], bool] = None) -> UserError:
    """One line: the first file missing from the first candidate directory that exists (a partial download), or
    the first expected file when none exists, and every directory looked in."""
    present = [d for d in looked if os.path.isdir(d)]
    missing = next((f for f in files if not exists(present[0], f)), files[0]) if present and exists else files[0]
    hint = "pass --download, or --data-dir DIR" if downloadable else "pass --data-dir DIR"
    return DatasetNotFound(f"{name} not found: no {missing} in {' or '.join(looked)}; {hint}")


def _find_dir(candidates: Sequence[str], files: Sequence[str], exists: Callable[[str, str], bool]):
    """The first candidate directory that holds every file, or None."""
    for d in candidates:
        if os.path.isdir(d) and all(exists(d, f) for f in files):
            return d
    return None


def _plain_exists(d: str, f: str) -> bool:
    return os.path.isfile(os.path.join(d, f))


def _gz_exists(d: str, f: str) -> bool:
    return _plain_exists(d, f) or _plain_exists(d, f + ".gz")


def cifar_dirs(name: str, data_dir: str) -> List[str]:
    folder = _CIFAR[name][0]
    return [os.path.join(data_dir, folder), os.path.join(data_dir, name, folder)]


def svhn_dirs(data_dir: str) -> List[str]:
    return [data_dir, os.path.join(data_dir, "SVHN")]


def mnist_dirs(data_dir: str) -> List[str]:
    return [os.path.join(data_dir, "MNIST", "raw"), os.path.join(data_dir, "MNIST"), data_dir]


# ----------------------------------------------------------------------------------------- CIFAR


def _load_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:  # truncated, not a pickle, wrong protocol, ...
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}; the file is corrupt, delete and re-download it")
    if not isinstance(obj, dict):
        raise UserError(f"cannot read {path}: expected a pickled dict, found {type(obj).__name__}")
    # The official files have bytes keys; accept str keys as well.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_batch(path: str, label_key: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    d = _load_pickle(path)
    if "data" not in d or label_key not in d:
        raise UserError(f"cannot read {path}: expected keys 'data' and {label_key!r}, found {sorted(d)}")
    try:
        x = np.asarray(d["data"], dtype=np.uint8)
        y = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
        x = x.reshape(-1, 3, 32, 32)  # rows are 3072 bytes in CHW order
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot read {path}: {e}")
    if len(x) != len(y):
        raise UserError(f"cannot read {path}: {len(x)} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"cannot read {path}: labels outside [0, {num_classes})")
    return x, y


def read_cifar(name: str, data_dir: str) -> Arrays:
    folder, train_files, test_files, label_key, num_classes = _CIFAR[name]
    looked = cifar_dirs(name, data_dir)
    d = _find_dir(looked, train_files + test_files, _plain_exists)
    if d is None:
        raise _missing_error(name, looked, train_files + test_files, downloadable=True, exists=_plain_exists)
    parts = [_cifar_batch(os.path.join(d, f), label_key, num_classes) for f in train_files]
    test_x, test_y = _cifar_batch(os.path.join(d, test_files[0]), label_key, num_classes)
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    return train_x, train_y, test_x, test_y


# ----------------------------------------------------------------------------------------- SVHN


def _svhn_file(path: str) -> Tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
        x = np.asarray(mat["X"])
        y = np.asarray(mat["y"]).astype(np.int64).reshape(-1)
    except Exception as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}; the file is corrupt, delete and re-download it")
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise UserError(f"cannot read {path}: expected X [32, 32, 3, N] and y [N, 1], got {x.shape} and {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() > 10):
        raise UserError(f"cannot read {path}: labels outside [0, 10]")
    # [H, W, C, N] -> [N, C, H, W]; the official files label digit 0 as 10.
    x = np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8)
    return x, y % 10


def read_svhn(data_dir: str) -> Arrays:
    looked = svhn_dirs(data_dir)
    d = _find_dir(looked, _SVHN_FILES, _plain_exists)
    if d is None:
        raise _missing_error("SVHN", looked, _SVHN_FILES, downloadable=True, exists=_plain_exists)
    train_x, train_y = _svhn_file(os.path.join(d, _SVHN_FILES[0]))
    test_x, test_y = _svhn_file(os.path.join(d, _SVHN_FILES[1]))
    return train_x, train_y, test_x, test_y


# ----------------------------------------------------------------------------------------- MNIST


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with ``ndim`` dimensions (plain or gzip-compressed)."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = bytearray(f.read())  # writable, so torch.from_numpy can share it
        magic = struct.unpack(">I", raw[:4])[0]
        if magic >> 16 != 0 or (magic >> 8) & 0xFF != 0x08 or magic & 0xFF != ndim:
            raise ValueError(f"bad magic number 0x{magic:08x} (want 0x{0x800 | ndim:08x}, unsigned bytes, {ndim}-d)")
        shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(shape)):
            raise ValueError(f"header says {shape} but holds {data.size} bytes")
    except Exception as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}; the file is corrupt, delete and re-download it")
    return data.reshape(shape)


def read_mnist(data_dir: str) -> Arrays:
    looked = mnist_dirs(data_dir)
    d = _find_dir(looked, _MNIST_FILES, _gz_exists)
    if d is None:
        raise _missing_error("MNIST", looked, [f"{f}[.gz]" for f in _MNIST_FILES], downloadable=True)

    def path(f: str) -> str:
        p = os.path.join(d, f)
        return p if os.path.isfile(p) else p + ".gz"

    out = []
    for images, labels in ((_MNIST_FILES[0], _MNIST_FILES[1]), (_MNIST_FILES[2], _MNIST_FILES[3])):
        x = _read_idx(path(images), 3)
        y = _read_idx(path(labels), 1).astype(np.int64)
        if len(x) != len(y) or (len(y) and y.max() > 9):
            raise UserError(f"cannot read {path(images)} / {path(labels)}: {len(x)} images, {len(y)} labels")
        out += [np.ascontiguousarray(x[:, None]), y]
    return tuple(out)


# ----------------------------------------------------------------------------------------- digits

DIGITS_SPLIT_SEED = 0  # fixed, independent of the run seed, so the test set never changes


def read_digits() -> Arrays:
    """scikit-learn's bundled 8x8 digits (values 0..16), stratified 80/20 split with a constant seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    y = d.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=DIGITS_SPLIT_SEED
    )
    return train_x, train_y, test_x, test_y


# ----------------------------------------------------------------------------------------- download


def download(name: str, data_dir: str) -> None:
    """Fetch the official files into the place the reader looks first (needs network access)."""
    import torchvision.datasets as tvd

    logger.info("downloading %s into %s", name, data_dir)
    try:
        os.makedirs(data_dir, exist_ok=True)
        if name == "CIFAR10":
            tvd.CIFAR10(root=data_dir, train=True, download=True)  # -> {data_dir}/cifar-10-batches-py
        elif name == "CIFAR100":
            tvd.CIFAR100(root=data_dir, train=True, download=True)  # -> {data_dir}/cifar-100-python
        elif name == "SVHN":
            tvd.SVHN(root=data_dir, split="train", download=True)  # -> {data_dir}/train_32x32.mat
            tvd.SVHN(root=data_dir, split="test", download=True)
        elif name == "MNIST":
            tvd.MNIST(root=data_dir, train=True, download=True)  # -> {data_dir}/MNIST/raw/*-ubyte
            tvd.MNIST(root=data_dir, train=False, download=True)
        else:
            raise UserError(f"{name} cannot be downloaded automatically; put it under --data-dir")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"downloading {name} into {data_dir} failed: {type(e).__name__}: {e}")


READERS: Dict[str, Callable[[str], Arrays]] = {
    "CIFAR10": lambda data_dir: read_cifar("CIFAR10", data_dir),
    "CIFAR100": lambda data_dir: read_cifar("CIFAR100", data_dir),
    "SVHN": read_svhn,
    "MNIST": read_mnist,
    "digits": lambda data_dir: read_digits(),
}


def load_arrays(name: str, data_dir: str, download_missing: bool) -> Arrays:
    """Read a small dataset; with ``download_missing``, fetch it first when the reader cannot find it."""
    reader = READERS[name]
    if name == "digits":
        return reader(data_dir)
    try:
        return reader(data_dir)
    except DatasetNotFound:
        if not download_missing:
            raise
    download(name, data_dir)
    return reader(data_dir)
