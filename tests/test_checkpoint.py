"""Checkpoint files as the original code writes them, and files that are not checkpoints at all."""
import os

import numpy as np
import pytest
import torch

from configs.errors import UserError
from models import create_model
from pruning.init import init_scores_from_weights, set_keep_rates
from pruning.wrap import masked_layers, sparsify
from tests.conftest import load_entry_point
from utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def original_harp_checkpoint(path):
    """What the original HARP train.py saves: a DataParallel state_dict with popup_scores/k_score, the optimizer
    state after its per-epoch cosine lr (a numpy float) was written into it, and a numpy best_prec1."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    sparsify(model, "weight", keep_min=0.01)
    init_scores_from_weights(model)
    set_keep_rates(model, {name: 0.5 for name, _ in masked_layers(model)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    for group in optimizer.param_groups:
        group["lr"] = 0.1 * 0.5 * (1 + np.cos(np.pi * 3 / 20))  # numpy scalar, as the original's schedule
    torch.save({"epoch": 4, "arch": "small_cnn", "best_prec1": np.float64(61.25),
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict()}, path)


def test_original_checkpoint_with_numpy_scalars_loads_and_evaluates(tmp_path):
    path = str(tmp_path / "model_best.pth.tar")
    original_harp_checkpoint(path)
    ckpt = load_checkpoint(path)  # weights_only=True with numpy scalars allowed
    assert float(ckpt["best_prec1"]) == 61.25 and isinstance(ckpt["optimizer"]["param_groups"][0]["lr"], np.floating)
    test_py = load_entry_point("test.py", "harp_test_entry")
    results = str(tmp_path / "r.json")
    assert test_py.main(["--dataset", "digits", "--exp-mode", "harp_finetune", "--k", "0.1", "--source-net", path,
                         "--attacks", "natural", "--n-examples", "40", "--no-progress",
                         "--results-file", results]) == 0
    assert os.path.isfile(results)


def test_numpy_1_spelling_of_the_scalar_loads(tmp_path):
    """Checkpoints written under numpy 1 name the scalar constructor numpy.core.multiarray.scalar."""
    import io
    import zipfile

    buffer = io.BytesIO()
    torch.save({"best_prec1": np.float64(3.5)}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    path = tmp_path / "numpy1.pth.tar"
    with zipfile.ZipFile(path, "w") as out:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            out.writestr(item, data)
    assert float(load_checkpoint(str(path))["best_prec1"]) == 3.5


@pytest.mark.parametrize("content", [os.urandom(4096), b"PK\x03\x04 truncated zip", b"hello"])
def test_a_corrupt_file_is_not_a_readable_checkpoint_and_gets_no_unsafe_advice(tmp_path, content):
    path = tmp_path / "broken.pth.tar"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_checkpoint(str(path))
    message = str(info.value)
    assert "not a readable checkpoint" in message and "\n" not in message
    assert "weights_only" not in message and "trust" not in message


def test_a_pickle_with_other_objects_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "code.pth.tar"
    torch.save({"hook": os.getcwd, "weights": torch.zeros(2)}, path)
    with pytest.raises(UserError) as info:
        load_checkpoint(str(path))
    message = str(info.value)
    assert "refused" in message and "weights_only" not in message and "\n" not in message


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    """Checkpoints and results must be as readable as any file the user creates (mkstemp alone gives 0600)."""
    from utils.atomic import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "result.json"), lambda fh: fh.write("{}"))
        with open(tmp_path / "plain.json", "w") as fh:
            fh.write("{}")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "result.json").st_mode & 0o777 == os.stat(tmp_path / "plain.json").st_mode & 0o777 == 0o644
