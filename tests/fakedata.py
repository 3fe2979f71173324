"""Tiny synthetic datasets written in the REAL on-disk formats, for tests of the real readers.

Images are weakly learnable: each class has its own mean colour, plus pixel noise, so a few training
steps beat chance. Labels cycle through all classes (as far as the example count allows) in shuffled order.
Every writer returns the ``data_dir`` to pass to ``build_data``.
"""
import os
import pickle
import struct

import numpy as np


def _labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    y = np.arange(n) % num_classes
    rng.shuffle(y)
    return y.astype(np.int64)


def _class_colours(num_classes: int) -> np.ndarray:
    """[num_classes, 3] distinct-ish mean colours in 30..225 (golden-ratio hue-like spread)."""
    c = np.arange(num_classes)[:, None]
    frac = (c * np.array([0.618034, 0.381966, 0.854102]) + np.array([0.1, 0.5, 0.3])) % 1.0
    return 30.0 + 195.0 * frac


def _images(y: np.ndarray, num_classes: int, channels: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, C, size, size]: class mean colour + Gaussian noise (std 25)."""
    colours = _class_colours(num_classes)[:, :channels]
    x = colours[y][:, :, None, None] + rng.normal(0.0, 25.0, (len(y), channels, size, size))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _dump(path: str, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root, n_train=64, n_test=32, seed=0) -> str:
    """{root}/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta as the official pickles."""
    rng = np.random.default_rng(seed)
    d = os.path.join(str(root), "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    y_train, y_test = _labels(n_train, 10, rng), _labels(n_test, 10, rng)
    x_train = _images(y_train, 10, 3, 32, rng).reshape(n_train, 3072)
    x_test = _images(y_test, 10, 3, 32, rng).reshape(n_test, 3072)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _dump(os.path.join(d, f"data_batch_{i}"), {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": [int(v) for v in y_train[part]],
            b"data": x_train[part],
            b"filenames": [f"train_{j}.png".encode() for j in part],
        })
    _dump(os.path.join(d, "test_batch"), {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in y_test],
        b"data": x_test,
        b"filenames": [f"test_{j}.png".encode() for j in range(n_test)],
    })
    _dump(os.path.join(d, "batches.meta"), {
        b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": 10000, b"num_vis": 3072,
    })
    return str(root)


def write_cifar100(root, n_train=64, n_test=32, seed=0) -> str:
    """{root}/cifar-100-python/train, test, meta as the official pickles (fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    d = os.path.join(str(root), "cifar-100-python")
    os.makedirs(d, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        y = _labels(n, 100, rng)
        _dump(os.path.join(d, split), {
            b"filenames": [f"{split}_{j}.png".encode() for j in range(n)],
            b"batch_label": split.encode(),
            b"fine_labels": [int(v) for v in y],
            b"coarse_labels": [int(v) // 5 for v in y],
            b"data": _images(y, 100, 3, 32, rng).reshape(n, 3072),
        })
    _dump(os.path.join(d, "meta"), {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    })
    return str(root)


def write_svhn(root, n_train=64, n_test=32, seed=0) -> str:
    """{root}/train_32x32.mat and test_32x32.mat: X uint8 [32, 32, 3, N], y uint8 [N, 1] with 10 for digit 0."""
    import scipy.io

    rng = np.random.default_rng(seed)
    os.makedirs(str(root), exist_ok=True)
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        y = _labels(n, 10, rng)
        x = _images(y, 10, 3, 32, rng).transpose(2, 3, 1, 0)  # [N, C, H, W] -> [H, W, C, N]
        stored = np.where(y == 0, 10, y).astype(np.uint8)[:, None]
        scipy.io.savemat(os.path.join(str(root), name), {"X": np.ascontiguousarray(x), "y": stored})
    return str(root)


def _write_idx(path: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 | array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def write_mnist(root, n_train=64, n_test=32, seed=0) -> str:
    """{root}/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (uncompressed IDX, torchvision's layout)."""
    rng = np.random.default_rng(seed)
    d = os.path.join(str(root), "MNIST", "raw")
    os.makedirs(d, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = _labels(n, 10, rng)
        x = _images(y, 10, 1, 28, rng)[:, 0]
        _write_idx(os.path.join(d, f"{prefix}-images-idx3-ubyte"), x)
        _write_idx(os.path.join(d, f"{prefix}-labels-idx1-ubyte"), y)
    return str(root)


def write_imagenet_folder(root, n_classes=3, n_train_per_class=4, n_val_per_class=2, size=40, seed=0) -> str:
    """{root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG (ImageNet-style synset folder names)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, per_class in (("train", n_train_per_class), ("val", n_val_per_class)):
        for c in range(n_classes):
            d = os.path.join(str(root), split, f"n{c:08d}")
            os.makedirs(d, exist_ok=True)
            y = np.full(per_class, c)
            imgs = _images(y, n_classes, 3, size, rng)
            for j, img in enumerate(imgs):
                Image.fromarray(img.transpose(1, 2, 0)).save(
                    os.path.join(d, f"{split}_{c}_{j}.JPEG"), format="JPEG", quality=90)
    return str(root)
