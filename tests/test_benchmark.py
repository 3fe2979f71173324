"""scripts/benchmark.py on a small model: the JSON it writes and the exactness of the dense export.

The timing thresholds themselves (R1 <= 8, R2 <= 1.2, R3 <= 1.05, R4 <= 1.02 for vgg16_bn at batch 32 on the
CPU) are not checked here: on a shared 2-core CI machine they are too noisy for a pass/fail test.
"""
import json
import os

import pytest
import torch

from pruning.wrap import masked_layers
from tests.conftest import load_entry_point

KEYS = {"R1", "R2", "R3", "R4", "R4_max_abs_diff", "images_per_s", "seconds", "samples", "device", "device_name",
        "torch", "bf16", "channels_last", "batch_size", "arch", "dataset", "input_shape", "forward_gflop_per_image",
        "threads", "within_thresholds"}
CONFIGS = {"plain_train", "pgd10_at", "pgd10_plain_frozen_w", "pgd10_harp_prune", "finetune_train", "fast_at",
           "forward_plain", "forward_dense_export", "pgd10_eval"}
CERTIFIED = {"smooth_train", "crown_ibp_train", "ibp_train", "sym_train", "ibp_verify", "sym_verify",
             "crown_ibp_verify", "certify_draws"}


benchmark = load_entry_point(os.path.join("scripts", "benchmark.py"), "harp_benchmark")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_run_reports_every_ratio_and_an_exact_export():
    result = benchmark.run("small_cnn", "CIFAR10", 4, "cpu", warmup=2, steps=2)
    assert KEYS <= set(result)
    assert set(result["seconds"]) == set(result["images_per_s"]) == set(result["samples"]) == CONFIGS
    assert all(len(v) == 2 for k, v in result["samples"].items() if k not in ("forward_plain", "forward_dense_export",
                                                                              "pgd10_eval"))
    assert result["R4_max_abs_diff"] == 0.0
    assert result["input_shape"] == [3, 32, 32] and result["batch_size"] == 4 and result["device"] == "cpu"
    for name in ("R1", "R2", "R3", "R4"):
        assert result[name] > 0
    assert result["R1"] == pytest.approx(result["seconds"]["pgd10_at"] / result["seconds"]["plain_train"])
    assert result["images_per_s"]["plain_train"] == pytest.approx(4 / result["seconds"]["plain_train"])
    assert "mfu_pgd10_at" not in result  # CUDA only
    json.dumps(result)  # plain JSON types only


def test_a_model_the_bounds_can_walk_also_times_the_certified_objectives():
    """cifar_model: no norm layers, so no frozen-weight configuration and no R2; the certified configurations at
    --epsilon, the symbolic ones on SYMBOLIC_POINTS points."""
    result = benchmark.run("cifar_model", "digits", 8, "cpu", warmup=2, steps=2, epsilon=0.1, compact=False)
    assert set(result["seconds"]) == CONFIGS - {"pgd10_plain_frozen_w"} | CERTIFIED
    assert "R2" not in result and "R2" not in result["within_thresholds"] and result["R1"] > 0
    assert result["threat"]["eps"] == 0.1
    assert result["images_per_s"]["sym_verify"] == pytest.approx(benchmark.SYMBOLIC_POINTS /
                                                                 result["seconds"]["sym_verify"])
    assert result["images_per_s"]["ibp_verify"] == pytest.approx(8 / result["seconds"]["ibp_verify"])
    assert result["images_per_s"]["certify_draws"] == pytest.approx(benchmark.CERTIFY_DRAWS /
                                                                    result["seconds"]["certify_draws"])
    json.dumps(result)


def test_data_dir_gives_the_benchmark_real_test_images(tmp_path):
    info = benchmark.dataset_info("digits")
    x, y = benchmark.benchmark_batch(info, 16, torch.device("cpu"), data_dir=str(tmp_path))
    real_x, real_y = next(iter(benchmark.build_data("digits", data_dir="").test_batches(16)))
    assert torch.equal(x, real_x) and torch.equal(y, real_y)
    random_x, _ = benchmark.benchmark_batch(info, 16, torch.device("cpu"))
    assert random_x.shape == x.shape and not torch.equal(random_x, x)
    with pytest.raises(benchmark.UserError, match="only 360"):
        benchmark.benchmark_batch(info, 400, torch.device("cpu"), data_dir=str(tmp_path))


def test_configurations_are_set_up_as_train_py_sets_up_each_stage():
    built = benchmark.build("small_cnn", "digits", 4, torch.device("cpu"))
    masked = built["masked"]
    layers = masked_layers(masked)
    assert layers and all(layer.mask_mode == "learn" for _, layer in layers)
    assert all(layer.popup_scores.requires_grad and layer.k_score.requires_grad and not layer.weight.requires_grad
               for _, layer in layers)
    keep = [float(layer.keep_rate().detach()) for _, layer in layers]
    assert keep == pytest.approx([benchmark.START_KEEP] * len(layers), rel=1e-4)
    assert not any(isinstance(m, type(layers[0][1])) for m in built["plain"].modules())
    assert all(p.requires_grad for p in built["plain"].parameters())


def test_cli_checks_its_protocol_and_writes_the_json(tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--steps", "4"])  # fewer than 5 timed steps
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--warmup", "1"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--arch", "vgg17"])
    out = tmp_path / "bench.json"
    assert benchmark.main(["--arch", "small_cnn", "--dataset", "digits", "--batch-size", "4", "--steps", "5",
                           "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written == json.loads(capsys.readouterr().out)
    assert written["dataset"] == "digits" and written["input_shape"] == [1, 8, 8]
    assert written["R4_max_abs_diff"] == 0.0 and all(len(v) >= 5 for v in written["samples"].values())
