"""train.py --tensorboard: every epoch's metrics.jsonl record mirrored as TensorBoard scalars in the run directory,
and one clear line when the optional tensorboard package is missing."""
import json
import os
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from utils.tensorboard_log import scalars

pytestmark = pytest.mark.usefixtures("one_thread")

# In-train pruning on digits: its records hold nested per-layer rates and booleans besides the plain numbers.
RUN = ["--dataset", "digits", "--exp-mode", "intrain", "--k", "0.3", "--epochs", "2", "--data-fraction", "0.1",
       "--no-progress"]


def run_directory(result_dir):
    return os.path.join(result_dir, "small_cnn", "digits", "pgd", "digits_weight_010_uni_0.3", "intrain")


def test_every_epoch_record_becomes_scalars_at_its_epoch(tmp_path):
    assert train.main(RUN + ["--result-dir", str(tmp_path), "--tensorboard"]) == 0
    directory = run_directory(str(tmp_path))
    with open(os.path.join(directory, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    events = EventAccumulator(os.path.join(directory, "tensorboard"))
    events.Reload()

    expected = {}
    for record in records:
        for tag, value in scalars(record):
            expected.setdefault(tag, []).append((record["epoch"], value))
    assert {"train_loss", "natural_acc", "robust_acc", "gamma", "keep", "is_best"} <= set(expected)
    assert any(tag.startswith("per_layer_keep/") for tag in expected)
    assert [step for step, _ in expected["train_loss"]] == [1, 2]
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        logged = [(event.step, event.value) for event in events.Scalars(tag)]
        assert [step for step, _ in logged] == [step for step, _ in points]
        assert [value for _, value in logged] == pytest.approx([value for _, value in points], rel=1e-6)


def test_without_the_tensorboard_package_the_option_fails_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert train.main(RUN + ["--result-dir", str(tmp_path), "--tensorboard"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "train.py: error: --tensorboard needs the tensorboard package: pip install tensorboard"
    assert not os.path.exists(run_directory(str(tmp_path)))  # nothing written
