"""The prune stage's budget: where the masks stand against the target, the floor that holds the learned rates on
it (--target-floor), the best-checkpoint rule's tolerance window, and the warning of a run that ends off target."""
import os

import pytest
import torch

from tests.conftest import ROOT, load_entry_point, read_metrics as _metrics
from models import create_model
from pruning.budget import TARGET_TOLERANCE, CostModel, GammaSchedule, budget_record, on_target
from pruning.graph import inspect_layers
from pruning.init import set_keep_rates, tie_rates
from pruning.wrap import masked_layers, sparsify
from trainers.regularizers import HardwareLoss

train = load_entry_point("train.py", "train_entry")


def masked_cnn(granularity: str, k: float, alpha: float = 0.1):
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    sparsify(model, granularity, keep_min=alpha * k)
    graph = inspect_layers(model, torch.zeros(1, 1, 8, 8))
    return model, CostModel(model, graph, granularity, k)


def soft(cost) -> float:
    return float(cost.soft_cost().detach())


def cost_gradient(model, cost):
    """d a / d r_l, per layer, at the model's current logits."""
    rates = [layer.k_score for _, layer in masked_layers(model)]
    return torch.stack(torch.autograd.grad(cost.soft_cost(), rates)).detach()


def logits(model):
    return torch.stack([layer.k_score.detach().clone() for _, layer in masked_layers(model)])


@pytest.mark.parametrize("granularity,k", [("weight", 0.01), ("weight", 0.001), ("channel", 0.25)])
def test_floor_lifts_a_cost_below_the_target_onto_it_along_the_costs_gradient(granularity, k):
    model, cost = masked_cnn(granularity, k)
    names = [name for name, _ in masked_layers(model)]
    set_keep_rates(model, {name: rate * k / 10 for name, rate in zip(names, (0.5, 0.2, 0.05, 0.1, 0.9))})
    assert soft(cost) < cost.target
    before = logits(model)
    gradient = cost_gradient(model, cost)
    shift = cost.raise_to_target()
    assert shift > 0
    assert soft(cost) == pytest.approx(cost.target, rel=1e-5) and soft(cost) >= cost.target
    assert torch.allclose(logits(model) - before, shift * gradient, rtol=1e-4, atol=1e-6)
    assert cost.raise_to_target() is None


def test_floor_leaves_a_cost_at_or_above_the_target_alone():
    model, cost = masked_cnn("weight", 0.01)
    set_keep_rates(model, {name: 0.1 for name, _ in masked_layers(model)})
    before = logits(model)
    assert cost.raise_to_target() is None
    assert torch.equal(logits(model), before)


def test_floor_moves_a_tied_rate_once_by_its_whole_gradient():
    model = create_model("resnet18", num_classes=10)
    sparsify(model, "channel", keep_min=0.025)
    graph = inspect_layers(model, torch.zeros(1, 3, 32, 32))
    ties = tie_rates(model, graph.tie_groups)
    layers = dict(masked_layers(model))
    follower, owner = next(iter(ties.items()))
    assert layers[follower].k_score is layers[owner].k_score
    cost = CostModel(model, graph, "channel", 0.25)
    set_keep_rates(model, {name: 0.1 for name in layers})
    before, gradient = logits(model), cost_gradient(model, cost)
    shift = cost.raise_to_target()
    assert soft(cost) == pytest.approx(cost.target, rel=1e-5) and soft(cost) >= cost.target
    assert torch.allclose(logits(model) - before, shift * gradient, rtol=1e-4, atol=1e-6)


def test_hardware_loss_applies_the_floor_after_a_step_only_when_asked():
    model, cost = masked_cnn("weight", 0.01)
    set_keep_rates(model, {name: 0.001 for name, _ in masked_layers(model)})
    HardwareLoss(cost, floor=False).after_step()
    assert soft(cost) < cost.target
    HardwareLoss(cost, floor=True).after_step()
    assert soft(cost) >= cost.target


def test_hard_cost_counts_the_kept_weights_and_the_budget_record_judges_them():
    model, cost = masked_cnn("weight", 0.01)
    set_keep_rates(model, {name: 0.01 for name, _ in masked_layers(model)})
    layers = [layer for _, layer in masked_layers(model)]
    kept = sum(layer.kept_count() for layer in layers)
    assert cost.hard_cost() == pytest.approx(kept / sum(layer.weight.numel() for layer in layers), rel=1e-12)
    record = cost.budget()
    assert record["measure"] == "keep" and record["target"] == 0.01 and record["on_target"]
    assert budget_record("channel", 0.0627, 0.0627 * (1 + 2 * TARGET_TOLERANCE))["on_target"] is False
    assert budget_record("channel", 0.0627, 0.05)["measure"] == "flops"
    assert on_target(0.0091, 0.01) and on_target(0.0109, 0.01)
    assert not on_target(0.0025, 0.01) and not on_target(0.0115, 0.01)


def test_gamma_schedule_is_the_hook_that_sets_the_hardware_loss_weight():
    model, cost = masked_cnn("weight", 0.01)
    loss = HardwareLoss(cost)
    schedule = GammaSchedule(0.5, regularizer=loss)
    assert schedule.before_epoch(1) == {"gamma": 1.0} and loss.weight == 1.0
    schedule.after_epoch(1, {"hw_loss": 0.0})
    assert schedule.before_epoch(5) == {"gamma": 1.0}
    assert schedule.state_dict() == {"gamma0": 0.5, "dynamic": True, "frozen": 1.0}


def test_every_dataset_preset_sets_the_prune_stages_gamma():
    """The built-in gamma 1.0 (the original's default) drives the rates far below a small target in one epoch."""
    import glob
    import yaml
    presets = glob.glob(os.path.join(ROOT, "configs", "config-*.yml"))
    assert len(presets) >= 6
    for path in presets:
        with open(path) as fh:
            preset = yaml.safe_load(fh)
        gamma = preset["per_mode"]["prune"].get("gamma")
        assert gamma is not None and 0 < gamma < 1, path


# ------------------------------------------------------------------------------------------ whole runs on digits
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    base = ["--dataset", "digits", "--result-dir", str(root), "--no-progress", "--data-fraction", "0.3"]
    assert train.main(base + ["--exp-mode", "pretrain", "--epochs", "2"]) == 0
    return root, base


def test_a_run_forced_off_target_warns_on_its_last_line_with_both_numbers(pretrained, capsys):
    root, base = pretrained
    argv = base + ["--exp-mode", "harp_prune", "--k", "0.01", "--gamma", "10", "--alpha", "0.01", "--epochs", "2",
                   "--no-target-floor", "--exp-name", "forced"]
    assert train.main(argv) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    run_dir = os.path.join(str(root), "small_cnn", "digits", "pgd", "forced", "harp_prune")
    records = _metrics(run_dir)
    assert all({"measure", "target", "reached", "on_target"} <= set(r["budget"]) for r in records)
    best = [r for r in records if r["is_best"]][-1]
    assert not best["budget"]["on_target"] and best["budget"]["reached"] < 0.009
    assert last.startswith("warning: off target") and "against the target 1 %" in last
    assert f"{100 * best['budget']['reached']:.4g} %" in last and "--target-floor" in last
    ckpt = torch.load(os.path.join(run_dir, "checkpoint", "model_best.pth.tar"), weights_only=False)
    assert ckpt["budget"] == best["budget"] and ckpt["best_rank"] == 1


def test_the_floor_holds_the_same_run_on_target(pretrained, capsys):
    root, base = pretrained
    argv = base + ["--exp-mode", "harp_prune", "--k", "0.01", "--gamma", "10", "--alpha", "0.01", "--epochs", "2",
                   "--exp-name", "floored"]
    assert train.main(argv) == 0
    assert "off target" not in capsys.readouterr().err
    records = _metrics(os.path.join(str(root), "small_cnn", "digits", "pgd", "floored", "harp_prune"))
    assert all(r["budget"]["on_target"] for r in records if r["target_met"])
    assert [r for r in records if r["is_best"]][-1]["budget"]["on_target"]
