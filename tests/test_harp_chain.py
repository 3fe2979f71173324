"""The seed harp_prune -> harp_finetune commands chained without paths, for both granularities, plus the
channel-granularity machinery (ties, FLOPs loss, export) on every residual architecture."""
import os

import pytest
import torch
import torch.nn.functional as F

import train
from models import create_model
from pruning.budget import CostModel
from pruning.graph import inspect_layers
from pruning.init import init_scores_from_weights, set_keep_rates, tie_rates
from pruning.trainable import set_trainable
from pruning.wrap import dense_state_dict, masked_layers, sparsify
from tests.fakedata import write_cifar10
from utils.checkpoint import load_checkpoint

K = "0.01"


def seed_command(mode, arch, granularity, extra):
    # The README's commands; a strategy that starts at the target (001_uni) so one epoch reaches it.
    argv = ["--arch", arch, "--dataset", "CIFAR10", "--exp-mode", mode, "--k", K, "--prune_reg", granularity,
            "--stg_id", "001_uni", "--adv_loss", "pgd", "--epochs", "1"]
    if mode == "harp_prune":
        argv += ["--gamma", "0.01"]
    return argv + extra


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    data_dir = write_cifar10(str(root / "data"), n_train=16, n_test=8)
    return data_dir, str(root / "results")


@pytest.mark.parametrize("arch", ["vgg16_bn", "resnet18"])
@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_seed_prune_then_finetune_chain(setting, arch, granularity):
    data_dir, result_dir = setting
    extra = ["--batch-size", "16", "--data-fraction", "1.0", "--data-dir", data_dir, "--result-dir", result_dir, "--no-progress"]
    pretrain_best = os.path.join(result_dir, arch, "CIFAR10", "pgd", "pretrain", "checkpoint", "model_best.pth.tar")
    if not os.path.exists(pretrain_best):
        assert train.main(["--arch", arch, "--dataset", "CIFAR10", "--exp-mode", "pretrain", "--adv_loss", "pgd",
                           "--epochs", "1"] + extra) == 0
    assert train.main(seed_command("harp_prune", arch, granularity, extra)) == 0
    assert train.main(seed_command("harp_finetune", arch, granularity, extra)) == 0

    run = os.path.join(result_dir, arch, "CIFAR10", "pgd", f"cifar10_{granularity}_001_uni_{K}", "harp_finetune")
    dense = load_checkpoint(os.path.join(run, "checkpoint", "model_best_dense.pth.tar"))["state_dict"]
    plain = create_model(arch, num_classes=10)
    plain.load_state_dict(dense, strict=True)  # the AP benchmark's base-model layout
    prunable = [name for name, m in plain.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    total = sum(dense[f"{n}.weight"].numel() for n in prunable)
    kept = sum(int((dense[f"{n}.weight"] != 0).sum()) for n in prunable)
    best = load_checkpoint(os.path.join(run, "checkpoint", "model_best.pth.tar"))
    if granularity == "weight":
        assert abs(kept / total - float(K)) < 0.001  # within 0.1 percentage points of k
    else:
        assert kept <= best["sparsity"]["kept"]
    assert best["sparsity"]["kept"] <= total


@pytest.mark.parametrize("arch,size,ties", [("vgg16_bn", 32, 0), ("resnet18", 32, 3), ("wrn_28_4", 32, 3), ("ResNet50", 64, 4)])
def test_channel_granularity_end_to_end(arch, size, ties):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10)
    sparsify(model, "channel", keep_min=0.01)
    graph = inspect_layers(model, torch.zeros(1, 3, size, size))
    tied = tie_rates(model, graph.tie_groups)
    assert len(tied) == ties
    for follower, owner in tied.items():
        assert dict(masked_layers(model))[follower].k_score is dict(masked_layers(model))[owner].k_score
    init_scores_from_weights(model)
    set_keep_rates(model, {name: 0.5 for name, _ in masked_layers(model)})
    set_trainable(model, weights=False, scores=True, rates=True, norm_layers=True)
    cost = CostModel(model, graph, "channel", 0.1)
    x, y = torch.rand(2, 3, size, size), torch.tensor([1, 2])
    hw, soft = cost.loss()
    (F.cross_entropy(model(x), y) + 0.1 * hw).backward()
    assert float(hw.detach()) > 0 and all(l.k_score.grad is not None for _, l in masked_layers(model))
    model.eval()
    plain = create_model(arch, num_classes=10).eval()
    plain.load_state_dict(dense_state_dict(model), strict=True)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
