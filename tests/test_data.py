"""data/: real-format readers on synthetic fixtures, sampling determinism, sharding, augmentation."""
import gzip
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from configs.errors import UserError
from data import (DatasetInfo, build_data, canonical_dataset_name, dataset_info, dataset_names)
from data import formats
from data.augment import crop_flip
from data.memory import TensorSource

try:
    import fakedata
except ImportError:  # tests/ imported as a package
    from tests import fakedata

SMALL_WRITERS = {
    "CIFAR10": fakedata.write_cifar10,
    "CIFAR100": fakedata.write_cifar100,
    "SVHN": fakedata.write_svhn,
    "MNIST": fakedata.write_mnist,
}
SHAPES = {"CIFAR10": (3, 32, 32), "CIFAR100": (3, 32, 32), "SVHN": (3, 32, 32), "MNIST": (1, 28, 28)}


def _all(batches):
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


def _index_source(n_train=50, n_test=23, **kw) -> TensorSource:
    """A source whose pixel [0, 0, 0] encodes the example's index (no augmentation: digits' info)."""
    def images(n):
        x = np.zeros((n, 1, 8, 8), np.uint8)
        x[:, 0, 0, 0] = np.arange(n)
        return x
    return TensorSource(dataset_info("digits"), images(n_train), np.arange(n_train) % 10,
                        images(n_test), np.arange(n_test) % 10, **kw)


def _ids(x: torch.Tensor) -> list:
    return torch.round(x[:, 0, 0, 0] * 255).long().tolist()


# ----------------------------------------------------------------------------------------- names and info


def test_canonical_names_are_case_insensitive():
    assert canonical_dataset_name("cifar10") == "CIFAR10"
    assert canonical_dataset_name("Cifar100") == "CIFAR100"
    assert canonical_dataset_name("svhn") == "SVHN"
    assert canonical_dataset_name("ImageNet") == "imagenet"
    assert canonical_dataset_name("DIGITS") == "digits"
    assert dataset_names() == ["CIFAR10", "CIFAR100", "SVHN", "MNIST", "imagenet", "digits"]


def test_unknown_dataset_lists_choices():
    with pytest.raises(UserError) as e:
        canonical_dataset_name("cifar11")
    assert "cifar11" in str(e.value)
    for name in dataset_names():
        assert name in str(e.value)
    with pytest.raises(UserError):
        build_data("tinyimagenet", data_dir="/nonexistent")


def test_dataset_info_static():
    c10 = dataset_info("cifar10")
    assert isinstance(c10, DatasetInfo)
    assert (c10.num_classes, c10.in_channels, c10.image_size) == (10, 3, 32)
    assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.2023, 0.1994, 0.2010)
    assert dataset_info("CIFAR100").num_classes == 100
    assert dataset_info("MNIST").image_size == 28 and dataset_info("MNIST").in_channels == 1
    assert dataset_info("digits").image_size == 8
    assert dataset_info("imagenet").image_size == 224 and dataset_info("imagenet").num_classes == 1000
    assert dataset_info("imagenet", image_dim=64).image_size == 64
    assert dataset_info("SVHN", image_dim=32).image_size == 32  # the native size is accepted
    with pytest.raises(UserError, match="image_dim"):
        dataset_info("CIFAR10", image_dim=64)
    with pytest.raises(Exception):
        c10.num_classes = 3  # frozen


# ----------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("name", list(SMALL_WRITERS))
def test_reader_on_real_format_fixture(tmp_path, name):
    data_dir = SMALL_WRITERS[name](tmp_path, n_train=40, n_test=20, seed=3)
    src = build_data(name.lower(), data_dir=data_dir)
    assert src.info.name == name
    assert (src.num_train, src.num_test, src.num_val) == (40, 20, 0)
    x, y = _all(src.test_batches(8))
    assert x.shape == (20,) + SHAPES[name] and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.shape == (20,)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    assert y.min() >= 0 and y.max() < src.info.num_classes
    assert torch.equal(src.test_labels(), y)
    assert torch.equal(src.test_labels(limit=5), y[:5])
    xt, yt = _all(src.train_batches(16, epoch=0, seed=0))
    assert xt.shape == (40,) + SHAPES[name]
    if name != "CIFAR100":  # 40 examples cannot cover 100 classes
        assert set(yt.tolist()) == set(range(10))


def test_cifar_pixels_are_chw(tmp_path):
    fakedata.write_cifar10(tmp_path, n_train=10, n_test=6)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    src = build_data("CIFAR10", data_dir=str(tmp_path))
    x, y = _all(src.test_batches(6))
    expect = torch.from_numpy(raw[b"data"].reshape(6, 3, 32, 32)).float() / 255
    assert torch.equal(x, expect)
    assert y.tolist() == raw[b"labels"]


def test_svhn_label_10_is_digit_0_and_pixels(tmp_path):
    import scipy.io

    fakedata.write_svhn(tmp_path, n_train=30, n_test=20)
    mat = scipy.io.loadmat(str(tmp_path / "test_32x32.mat"))
    stored = mat["y"].reshape(-1)
    assert (stored == 10).any() and not (stored == 0).any()  # the fixture uses the official convention
    src = build_data("SVHN", data_dir=str(tmp_path))
    labels = src.test_labels()
    assert labels.max() <= 9
    assert torch.equal(labels == 0, torch.from_numpy(stored == 10))
    assert torch.equal(labels[stored != 10], torch.from_numpy(stored[stored != 10].astype(np.int64)))
    x, _ = next(src.test_batches(1))
    assert torch.equal(x[0], torch.from_numpy(mat["X"][:, :, :, 0].transpose(2, 0, 1).copy()).float() / 255)


def test_alternative_layouts(tmp_path):
    # CIFAR10 under {data_dir}/CIFAR10/, SVHN under {data_dir}/SVHN, MNIST gzipped directly in {data_dir}/MNIST.
    fakedata.write_cifar10(tmp_path / "CIFAR10", n_train=10, n_test=5)
    fakedata.write_cifar100(tmp_path / "CIFAR100", n_train=10, n_test=5)
    fakedata.write_svhn(tmp_path / "SVHN", n_train=10, n_test=5)
    fakedata.write_mnist(tmp_path / "m", n_train=10, n_test=5)
    os.makedirs(tmp_path / "MNIST")
    for f in os.listdir(tmp_path / "m" / "MNIST" / "raw"):
        with open(tmp_path / "m" / "MNIST" / "raw" / f, "rb") as src, gzip.open(tmp_path / "MNIST" / (f + ".gz"), "wb") as dst:
            dst.write(src.read())
    for name in ("CIFAR10", "CIFAR100", "SVHN", "MNIST"):
        src = build_data(name, data_dir=str(tmp_path))
        assert (src.num_train, src.num_test) == (10, 5)
    plain = build_data("MNIST", data_dir=str(tmp_path / "m"))
    gz = build_data("MNIST", data_dir=str(tmp_path))
    assert torch.equal(_all(plain.test_batches(5))[0], _all(gz.test_batches(5))[0])


@pytest.mark.parametrize("name", ["CIFAR10", "CIFAR100", "SVHN", "MNIST"])
def test_missing_files_name_the_paths(tmp_path, name):
    with pytest.raises(UserError) as e:
        build_data(name, data_dir=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "--download" in msg and "--data-dir" in msg
    if name == "CIFAR10":
        assert os.path.join(str(tmp_path / "nowhere"), "cifar-10-batches-py") in msg
        assert os.path.join(str(tmp_path / "nowhere"), "CIFAR10", "cifar-10-batches-py") in msg


def test_missing_imagenet_names_the_paths(tmp_path):
    with pytest.raises(UserError) as e:
        build_data("imagenet", data_dir=str(tmp_path), workers=0)
    msg = str(e.value)
    assert "train/ and val/" in msg and os.path.join(str(tmp_path), "ImageNet") in msg and "--data-dir" in msg
    assert "\n" not in msg


def test_partial_cifar_dir_is_missing(tmp_path):
    fakedata.write_cifar10(tmp_path, n_train=10, n_test=5)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(UserError, match="data_batch_3"):
        build_data("CIFAR10", data_dir=str(tmp_path))


def test_corrupt_files_name_the_file(tmp_path):
    fakedata.write_cifar10(tmp_path, n_train=10, n_test=5)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(UserError, match="data_batch_2"):
        build_data("CIFAR10", data_dir=str(tmp_path))

    fakedata.write_svhn(tmp_path, n_train=10, n_test=5)
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(UserError, match="test_32x32.mat"):
        build_data("SVHN", data_dir=str(tmp_path))

    fakedata.write_mnist(tmp_path, n_train=10, n_test=5)
    idx = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    idx.write_bytes(idx.read_bytes()[:-7])  # truncated
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        build_data("MNIST", data_dir=str(tmp_path))


def test_download_only_when_missing(tmp_path, monkeypatch):
    calls = []

    def fake_download(name, data_dir):
        calls.append(name)
        fakedata.write_cifar10(data_dir, n_train=10, n_test=5)

    monkeypatch.setattr(formats, "download", fake_download)
    src = build_data("CIFAR10", data_dir=str(tmp_path), download=True)  # missing: downloads, then reads
    assert calls == ["CIFAR10"] and src.num_train == 10
    build_data("CIFAR10", data_dir=str(tmp_path), download=True)  # present: read as is (no MD5 check)
    assert calls == ["CIFAR10"]


def test_fake_images_are_learnable(tmp_path):
    fakedata.write_cifar10(tmp_path, n_train=200, n_test=100)
    src = build_data("CIFAR10", data_dir=str(tmp_path))
    train_x, train_y, test_x, test_y = formats.read_cifar("CIFAR10", str(tmp_path))
    means = np.stack([train_x[train_y == c].mean(axis=(0, 2, 3)) for c in range(10)])
    pred = np.argmin(((test_x.mean(axis=(2, 3))[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == test_y).mean() > 0.5  # chance is 0.1
    assert src.num_test == 100


# ----------------------------------------------------------------------------------------- digits


def test_digits_fixed_split():
    a = build_data("digits", data_dir="ignored", seed=0)
    b = build_data("DIGITS", data_dir="/also/ignored", seed=123)
    assert (a.num_train, a.num_test) == (1437, 360)
    assert (b.num_train, b.num_test) == (1437, 360)
    assert torch.equal(a.test_labels(), b.test_labels())
    assert torch.equal(_all(a.test_batches(100))[0], _all(b.test_batches(100))[0])
    counts = torch.bincount(a.test_labels(), minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37  # stratified
    x, _ = _all(a.test_batches(360))
    assert x.shape == (360, 1, 8, 8) and x.max() == 1.0 and x.min() == 0.0
    # 0..16 scaled as value/16 (to uint8 precision)
    from sklearn.datasets import load_digits
    values = load_digits().images / 16.0
    closest = np.abs(values - x[0, 0].numpy()[None]).reshape(len(values), -1).max(1).min()
    assert closest <= 0.5 / 255 + 1e-6  # the test image is a real digit, scaled as value/16


def test_digits_mean_std_constants_match_training_split():
    src = build_data("digits", data_dir="")
    x, _ = _all(src.train_batches(1437, epoch=0, seed=0))
    assert abs(x.mean().item() - src.info.mean[0]) < 1e-3
    assert abs(x.std().item() - src.info.std[0]) < 1e-3


# ----------------------------------------------------------------------------------------- subsets and splits


def test_data_fraction_subset_is_fixed_by_seed():
    def ids(**kw):
        src = _index_source(n_train=100, **kw)
        return src.num_train, sorted(_ids(_all(src.train_batches(32, epoch=0, seed=9))[0]))

    n, a = ids(data_fraction=0.25, seed=1)
    assert n == 25 and len(set(a)) == 25
    assert ids(data_fraction=0.25, seed=1)[1] == a
    assert ids(data_fraction=0.25, seed=2)[1] != a
    # The subset depends on the build seed only, not on the epoch or the epoch seed.
    src = _index_source(n_train=100, data_fraction=0.25, seed=1)
    assert sorted(_ids(_all(src.train_batches(7, epoch=5, seed=77))[0])) == a
    assert _index_source(n_train=100, data_fraction=0.333).num_train == 33
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(UserError, match="data_fraction"):
            _index_source(data_fraction=bad)
    with pytest.raises(UserError):
        _index_source(n_train=10, data_fraction=0.05)  # int(0.5) == 0 examples


def test_val_split_sizes_and_disjointness():
    src = _index_source(n_train=100, data_fraction=0.5, val_split=0.2, seed=4)
    assert (src.num_train, src.num_val) == (40, 10)
    train_ids = set(_ids(_all(src.train_batches(16, epoch=0, seed=0))[0]))
    val_x, _ = _all(src.val_batches(3))
    val_ids = _ids(val_x)
    assert len(train_ids) == 40 and len(set(val_ids)) == 10 and not train_ids & set(val_ids)
    assert _ids(_all(src.val_batches(4))[0]) == val_ids  # fixed order
    again = _index_source(n_train=100, data_fraction=0.5, val_split=0.2, seed=4)
    assert _ids(_all(again.val_batches(10))[0]) == val_ids
    assert src.num_batches("val", 3) == 4
    with pytest.raises(UserError, match="val_split"):
        _index_source(val_split=1.0)
    with pytest.raises(ValueError):
        list(_index_source().val_batches(4))


def test_val_split_is_not_augmented(tmp_path):
    fakedata.write_cifar10(tmp_path, n_train=40, n_test=10)
    src = build_data("CIFAR10", data_dir=str(tmp_path), val_split=0.25, seed=0)
    assert (src.num_train, src.num_val) == (30, 10)
    originals = torch.from_numpy(formats.read_cifar("CIFAR10", str(tmp_path))[0]).float() / 255
    val_x, _ = _all(src.val_batches(4))
    dist = ((val_x[:, None] - originals[None]) ** 2).flatten(2).sum(-1).min(1).values
    assert torch.all(dist == 0)


# ----------------------------------------------------------------------------------------- epochs, shards


def test_train_batches_deterministic_per_seed_and_epoch(tmp_path):
    fakedata.write_cifar10(tmp_path, n_train=48, n_test=8)
    src = build_data("CIFAR10", data_dir=str(tmp_path))
    a = list(src.train_batches(16, epoch=3, seed=5))
    resumed = build_data("CIFAR10", data_dir=str(tmp_path))  # a fresh process after a resume
    b = list(resumed.train_batches(16, epoch=3, seed=5))
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = list(src.train_batches(16, epoch=4, seed=5))
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))
    d = list(src.train_batches(16, epoch=3, seed=6))
    assert not all(torch.equal(xa, xd) for (xa, _), (xd, _) in zip(a, d))
    # The global RNG is neither used nor disturbed.
    state = torch.get_rng_state()
    list(src.train_batches(16, epoch=0, seed=0))
    assert torch.equal(state, torch.get_rng_state())


def test_every_example_once_per_epoch_and_last_batch_partial():
    src = _index_source(n_train=50)
    batches = list(src.train_batches(16, epoch=0, seed=0))
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    ids = _ids(torch.cat([x for x, _ in batches]))
    assert sorted(ids) == list(range(50)) and ids != list(range(50))
    assert src.num_batches("train", 16) == 4


@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_rank_sharding_splits_one_permutation(world_size):
    n = 50
    src = _index_source(n_train=n)
    full = _ids(_all(src.train_batches(64, epoch=2, seed=1))[0])
    shards = [_ids(_all(src.train_batches(5, epoch=2, seed=1, rank=r, world_size=world_size))[0])
              for r in range(world_size)]
    per_rank = -(-n // world_size)
    padded = [full[i % n] for i in range(per_rank * world_size)]  # wrapped to a multiple of world_size
    for r, shard in enumerate(shards):
        assert len(shard) == per_rank
        assert shard == padded[r::world_size]
        assert src.num_batches("train", 5, world_size=world_size) == -(-per_rank // 5)
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(n))
    assert len(flat) - n == per_rank * world_size - n  # only the wrapped padding repeats
    with pytest.raises(ValueError):
        list(src.train_batches(5, epoch=0, seed=0, rank=world_size, world_size=world_size))


def test_augmentation_independent_of_world_size(tmp_path):
    fakedata.write_cifar10(tmp_path, n_train=41, n_test=4)
    src = build_data("CIFAR10", data_dir=str(tmp_path))
    full_x, _ = _all(src.train_batches(41, epoch=1, seed=2))
    r1_x, _ = _all(src.train_batches(7, epoch=1, seed=2, rank=1, world_size=2))
    assert torch.equal(r1_x, full_x[list(range(1, 41, 2)) + [0]])  # padded by wrapping to the start
    r2_x, _ = _all(src.train_batches(7, epoch=1, seed=2, rank=2, world_size=3))
    assert torch.equal(r2_x, full_x[list(range(2, 41, 3)) + [0]])


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_test_sharding_contiguous(world_size):
    src = _index_source(n_test=23)
    full = _ids(_all(src.test_batches(100))[0])
    assert full == list(range(23))
    limited = [i for r in range(world_size)
               for i in _ids(_all(src.test_batches(3, limit=10, rank=r, world_size=world_size))[0])]
    assert limited == list(range(10))
    parts = [_ids(_all(src.test_batches(4, rank=r, world_size=world_size))[0]) for r in range(world_size)]
    assert [i for p in parts for i in p] == full
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    assert src.num_batches("test", 4, world_size=world_size) == max(-(-len(p) // 4) for p in parts)
    assert src.num_batches("test", 4, limit=10, world_size=world_size) == -(-(-(-10 // world_size)) // 4)
    assert src.test_labels(limit=10).tolist() == [i % 10 for i in range(10)]


def test_to_device_moves_once():
    src = _index_source()
    assert src.to("cpu") is src and src.to(torch.device("cpu")) is src
    x, y = next(src.test_batches(4))
    assert x.device.type == "cpu" and y.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_batches_on_cuda(tmp_path):
    fakedata.write_cifar10(tmp_path, n_train=40, n_test=10)
    cpu = build_data("CIFAR10", data_dir=str(tmp_path))
    gpu = build_data("CIFAR10", data_dir=str(tmp_path)).to("cuda")
    for (xc, yc), (xg, yg) in zip(cpu.train_batches(16, epoch=1, seed=3), gpu.train_batches(16, epoch=1, seed=3)):
        assert xg.is_cuda and yg.is_cuda and xg.dtype == torch.float32 and yg.dtype == torch.int64
        assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())
    xg, _ = next(gpu.test_batches(10))
    assert xg.is_cuda


# ----------------------------------------------------------------------------------------- augmentation


def test_crop_flip_function():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 6, 7), generator=g, dtype=torch.uint8)
    center = torch.full((5, 2), 2)
    no = torch.zeros(5, dtype=torch.bool)
    assert torch.equal(crop_flip(x, center, no, 2), x)
    assert torch.equal(crop_flip(x, center, ~no, 2), x.flip(-1))
    corner = crop_flip(x, torch.zeros(5, 2, dtype=torch.long), no, 2)
    assert torch.all(corner[:, :, :2] == 0) and torch.all(corner[:, :, :, :2] == 0)
    assert torch.equal(corner[:, :, 2:, 2:], x[:, :, :4, :5])
    # Mixed offsets and flips against a per-image reference.
    offsets = torch.randint(0, 5, (5, 2), generator=g)
    flips = torch.rand(5, generator=g) < 0.5
    out = crop_flip(x, offsets, flips, 2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(5):
        dy, dx = offsets[i].tolist()
        ref = padded[i, :, dy:dy + 6, dx:dx + 7]
        assert torch.equal(out[i], ref.flip(-1) if flips[i] else ref)


def _min_dist_to_originals(x, originals):
    return ((x[:, None] - originals[None]) ** 2).flatten(2).sum(-1).min(1).values


@pytest.mark.parametrize("name", ["CIFAR10", "SVHN"])
def test_cifar_and_svhn_training_is_augmented(tmp_path, name):
    SMALL_WRITERS[name](tmp_path, n_train=40, n_test=8)
    src = build_data(name, data_dir=str(tmp_path))
    originals = torch.from_numpy(formats.READERS[name](str(tmp_path))[0]).float() / 255
    x, _ = _all(src.train_batches(16, epoch=0, seed=0))
    assert x.shape == (40, 3, 32, 32)
    changed = _min_dist_to_originals(x, originals) > 0
    assert changed.sum() >= 20  # 1 in 81 x 2 chance per image of being the identity
    test_x, _ = _all(src.test_batches(8))
    assert torch.all(_min_dist_to_originals(test_x, torch.from_numpy(
        formats.READERS[name](str(tmp_path))[2]).float() / 255) == 0)


def test_mnist_and_digits_are_not_augmented(tmp_path):
    fakedata.write_mnist(tmp_path, n_train=30, n_test=5)
    mnist = build_data("MNIST", data_dir=str(tmp_path))
    originals = torch.from_numpy(formats.read_mnist(str(tmp_path))[0]).float() / 255
    x, _ = _all(mnist.train_batches(8, epoch=1, seed=1))
    assert torch.all(_min_dist_to_originals(x, originals) == 0)
    digits = build_data("digits", data_dir="", data_fraction=0.1)
    ids = _all(digits.train_batches(50, epoch=0, seed=0))[0]
    originals = torch.from_numpy(formats.read_digits()[0]).float() / 255
    assert torch.all(_min_dist_to_originals(ids, originals) == 0)


# ----------------------------------------------------------------------------------------- imagenet folder


def test_imagenet_folder(tmp_path):
    root = fakedata.write_imagenet_folder(tmp_path / "inet", n_classes=3, n_train_per_class=4, n_val_per_class=2)
    src = build_data("imagenet", data_dir=root, image_dim=32, workers=0)
    assert src.info.num_classes == 3 and src.info.image_size == 32 and src.info.in_channels == 3
    assert (src.num_train, src.num_test, src.num_val) == (12, 6, 0)
    x, y = _all(src.test_batches(4))
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [0, 1, 2, 0, 1, 2] == src.test_labels().tolist()  # classes interleaved
    assert src.test_labels(limit=3).tolist() == [0, 1, 2]
    colours = torch.tensor(fakedata._class_colours(3), dtype=torch.float32) / 255
    nearest = ((x.mean((2, 3))[:, None] - colours[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(nearest, y)  # each image arrives with its own label
    assert src.num_batches("test", 4) == 2
    state = torch.get_rng_state()
    a = list(src.train_batches(5, epoch=0, seed=1))
    assert torch.equal(state, torch.get_rng_state())
    assert [len(b[1]) for b in a] == [5, 5, 2] and a[0][0].shape == (5, 3, 32, 32)
    assert sorted(torch.cat([b[1] for b in a]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    b = list(src.train_batches(5, epoch=0, seed=1))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    c = list(src.train_batches(5, epoch=1, seed=1))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    r1 = _all(src.train_batches(4, epoch=0, seed=1, rank=1, world_size=2))[0]
    assert torch.equal(r1, torch.cat([b[0] for b in a])[1::2])  # same augmentation whatever the sharding
    assert len(list(src.test_batches(2, limit=3, rank=1, world_size=2))) == 1


def test_imagenet_subset_val_and_layouts(tmp_path):
    fakedata.write_imagenet_folder(tmp_path / "ImageNet", n_classes=2, n_train_per_class=10, n_val_per_class=1,
                                   size=24)
    src = build_data("IMAGENET", data_dir=str(tmp_path), image_dim=16, workers=0, data_fraction=0.5,
                     val_split=0.2, seed=3)
    assert (src.num_train, src.num_val, src.num_test) == (8, 2, 2)
    x, _ = _all(src.val_batches(2))
    assert x.shape == (2, 3, 16, 16)
    assert dataset_info("imagenet").num_classes == 1000  # static facts do not look at files


def test_imagenet_val_missing_a_class_keeps_indices(tmp_path):
    root = fakedata.write_imagenet_folder(tmp_path, n_classes=3, n_train_per_class=2, n_val_per_class=2, size=16)
    shutil.rmtree(tmp_path / "val" / "n00000000")
    src = build_data("imagenet", data_dir=root, image_dim=16, workers=0)
    assert src.test_labels().tolist() == [1, 2, 1, 2]


def test_imagenet_with_worker_processes(tmp_path):
    root = fakedata.write_imagenet_folder(tmp_path, n_classes=2, n_train_per_class=3, n_val_per_class=1, size=16)
    src = build_data("imagenet", data_dir=root, image_dim=16, workers=0)
    with_workers = build_data("imagenet", data_dir=root, image_dim=16, workers=2)
    a = _all(src.train_batches(2, epoch=0, seed=0))
    b = _all(with_workers.train_batches(2, epoch=0, seed=0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
