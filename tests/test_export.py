"""scripts/export.py: a run's checkpoint, rebuilt from the config stored in it, exported as a compact torch.export
program or, when asked, TorchScript (channel pruning: same logits, fewer MACs, loadable without the toolkit) or a sparse file (weight pruning:
at 99 % pruning a few percent of a dense state dict's bytes); and scripts/benchmark.py's compact entry."""
import json
import os
import warnings

import pytest
import torch

import train
from configs.recipes import RECIPES
from configs.schema import Config, config_to_dict
from data.info import dataset_info
from pruning.compact import count_macs
from pruning.wrap import freeze_masks
from scripts import export
from stage import build_model, example_input, init_pruning_state, inspect_masked
from tests.conftest import load_entry_point
from utils.checkpoint import save_atomic

benchmark = load_entry_point(os.path.join("scripts", "benchmark.py"), "harp_benchmark_for_export")

pytestmark = pytest.mark.usefixtures("one_thread")


def channel_checkpoint(tmp_path, arch, k=0.5):
    """A harp_finetune checkpoint as train.py writes one: magnitude-score channel masks at k on random weights with
    non-trivial BatchNorm statistics, and the resolved config."""
    torch.manual_seed(0)
    cfg = Config(arch=arch, dataset="CIFAR10", exp_mode="harp_finetune", prune_reg="channel", k=k, num_classes=10,
                 stg_id="original", scaled_score_init=True, rate_stg_init=False)
    info = dataset_info("CIFAR10")
    model = build_model(cfg, info, torch.device("cpu"), masked=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.reset_parameters()  # logits large enough for a 1e-5 comparison to mean something
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    inspect_masked(cfg, model, info, torch.device("cpu"))
    init_pruning_state(cfg, RECIPES["lwm_finetune"], model)
    freeze_masks(model)
    path = str(tmp_path / arch / "checkpoint" / "model_best.pth.tar")
    save_atomic({"epoch": 1, "arch": arch, "state_dict": model.state_dict(), "config": config_to_dict(cfg)}, path)
    return path, model.eval()


@pytest.mark.parametrize("arch", ["vgg16_bn", "resnet18"])
def test_channel_pruned_checkpoints_export_to_smaller_torchscript_with_the_same_logits(tmp_path, arch):
    path, masked = channel_checkpoint(tmp_path, arch)
    report = export.export_checkpoint(path, torchscript=True)
    assert report["file"] == str(tmp_path / arch / "export" / "model_best_compact.pt")
    loaded = torch.jit.load(report["file"])  # TorchScript: no toolkit class involved
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = masked(x)
        gap = float((loaded(x) - expected).abs().max())
    assert gap < 1e-5 and float(expected.abs().max()) > 0.01 and report["max_abs_diff"] < 1e-5
    example = example_input(dataset_info("CIFAR10"), torch.device("cpu"))
    assert report["macs"] == count_macs(masked, example) and report["compact_macs"] < 0.6 * report["macs"]
    assert report["compact_params"] < report["params"]
    with open(report["file"] + ".json") as fh:
        assert json.load(fh)["mac_ratio"] == pytest.approx(report["macs"] / report["compact_macs"])


@pytest.mark.parametrize("arch", ["vgg16_bn", "resnet18"])
def test_channel_pruned_checkpoints_export_to_a_torch_export_program_with_the_same_logits(tmp_path, arch):
    """The default format: torch.export (.pt2), loadable with torch.export.load, any batch size, the masked model's
    logits, and no FutureWarning on the way (TorchScript's deprecation warnings are only for --torchscript)."""
    path, masked = channel_checkpoint(tmp_path, arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        report = export.export_checkpoint(path)
    assert report["file"] == str(tmp_path / arch / "export" / "model_best_compact.pt2")
    assert report["format"] == "torch.export" and report["max_abs_diff"] < 1e-5
    program = torch.export.load(report["file"]).module()
    for batch in (1, 5):
        x = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            expected = masked(x)
            gap = float((program(x) - expected).abs().max())
        assert gap < 1e-5 and float(expected.abs().max()) > 0.01
    assert report["compact_macs"] < 0.6 * report["macs"] and report["compact_params"] < report["params"]


def test_a_trained_run_exports_by_its_flags(tmp_path, capsys):
    """The real chain on digits: pretrain, then LWM at channel k 0.5 and at weight k 0.01, each exported by the flags
    that name the run (as test.py takes them)."""
    run = ["--dataset", "digits", "--result-dir", str(tmp_path), "--data-fraction", "0.1", "--no-progress",
           "--epochs", "1", "--lr-schedule", "constant"]
    assert train.main(run + ["--exp-mode", "pretrain"]) == 0
    channel = ["--exp-mode", "lwm_finetune", "--k", "0.5", "--prune-reg", "channel"]
    weight = ["--exp-mode", "lwm_finetune", "--k", "0.01", "--prune-reg", "weight"]
    assert train.main(run + channel) == 0 and train.main(run + weight) == 0
    capsys.readouterr()
    names = ["--dataset", "digits", "--result-dir", str(tmp_path)]

    assert export.main(names + channel + ["--speed-batch", "4", "--torchscript"]) == 0
    assert "compact TorchScript" in capsys.readouterr().out
    compact = tmp_path / "small_cnn" / "digits" / "pgd" / "digits_channel_010_uni_0.5" / "lwm_finetune" / "export"
    report = json.loads((compact / "model_best_compact.pt.json").read_text())
    assert report["speedup"] > 0 and report["max_abs_diff"] < 1e-5 and report["speed_batch"] == 4
    assert report["arch"] == "small_cnn" and report["prune_reg"] == "channel" and report["k"] == 0.5
    assert export.main(names + channel) == 0  # by default a torch.export program
    assert "compact torch.export program" in capsys.readouterr().out
    report = json.loads((compact / "model_best_compact.pt2.json").read_text())
    assert report["format"] == "torch.export" and report["max_abs_diff"] < 1e-5
    assert (compact / "model_best_compact.pt2").is_file()

    assert export.main(names + weight) == 0
    assert "sparse checkpoint" in capsys.readouterr().out
    sparse = tmp_path / "small_cnn" / "digits" / "pgd" / "digits_weight_010_uni_0.01" / "lwm_finetune" / "export"
    report = json.loads((sparse / "model_best_sparse.pth.json").read_text())
    assert report["bytes_ratio"] <= 0.03 and report["max_abs_diff"] == 0.0  # the issue: <= 3 % at 99 % pruning

    assert export.main(names + ["--exp-mode", "pretrain"]) == 2
    assert "nothing pruned to export" in capsys.readouterr().err


def test_benchmark_reports_the_compact_speedup_next_to_its_mac_ratio():
    result = benchmark.run("small_cnn", "CIFAR10", 4, "cpu", warmup=2, steps=2)
    compact = result["compact"]
    assert compact["k"] == benchmark.COMPACT_K and compact["max_abs_diff"] < 1e-5
    assert compact["mac_ratio"] == pytest.approx(compact["macs"] / compact["compact_macs"]) and compact["mac_ratio"] > 1
    assert compact["speedup"] == pytest.approx(compact["seconds"]["forward_reference"] /
                                               compact["seconds"]["forward_compact"])
    assert compact["speedup_over_mac_ratio"] == pytest.approx(compact["speedup"] / compact["mac_ratio"])
    json.dumps(result)
    assert "compact" not in benchmark.run("small_cnn", "CIFAR10", 4, "cpu", warmup=2, steps=2, compact=False)
