"""In-train pruning (`--exp-mode intrain`, pruning/gates.py): the gates' straight-through gradient, their keep rate,
the hard projection onto the budget (both ways), tied channel gates, and train.py -> resume -> test.py -> dense
export -> intrain_finetune on digits."""
import dataclasses
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from configs.cli import resolve_config
from configs.recipes import MASKS_GATES
from pruning.budget import CostModel
from pruning.gates import (BUDGET_TOLERANCE, GateMixin, gate_slope, on_budget, project_to_target, tie_gates,
                           unique_gates)
from pruning.graph import inspect_layers
from pruning.wrap import masked_layers, sparsify
from scripts.results import method_of
from trainers.regularizers import GateBudgetLoss
from stage import build_model, load_data
from tests.conftest import load_entry_point
from utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = torch.zeros(1, 2, 4, 4)


def tiny(granularity, keep_min=0.0, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
    sparsify(model, granularity, keep_min=keep_min, kind=MASKS_GATES)
    for gates in unique_gates(layer for _, layer in masked_layers(model)):
        with torch.no_grad():
            gates.normal_()
    return model


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_gates_mask_the_weight_with_a_straight_through_gradient(granularity):
    model = tiny(granularity)
    conv, linear = model[0], model[3]
    x, r = torch.rand(3, 2, 4, 4), torch.randn(3, 5)
    (model(x) * r).sum().backward()
    # the same network with W_eff = W * M as leaves gives g = dL/dW_eff
    masks = [(layer.popup_scores.detach() > 0).float() for layer in (conv, linear)]
    w_conv = (conv.weight.detach() * masks[0]).requires_grad_(True)
    w_lin = (linear.weight.detach() * masks[1]).requires_grad_(True)
    out = F.linear(F.relu(F.conv2d(x, w_conv, padding=1)).flatten(1), w_lin, linear.bias.detach())
    (out * r).sum().backward()
    for layer, mask, leaf in ((conv, masks[0], w_conv), (linear, masks[1], w_lin)):
        assert torch.allclose(layer.weight.grad, leaf.grad * mask, atol=1e-6)
        grad_mask = leaf.grad * layer.weight.detach()
        if granularity == "channel":
            grad_mask = grad_mask.sum(dim=[d for d in range(grad_mask.dim()) if d != 1], keepdim=True)
        expected = grad_mask * 0.5 * (1 - torch.tanh(layer.popup_scores.detach()) ** 2)
        assert torch.allclose(layer.popup_scores.grad, expected, atol=1e-6)
        assert layer.popup_scores.grad.abs().sum() > 0


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_keep_rate_is_the_exact_kept_fraction_with_the_soft_gates_gradient(granularity):
    layer = tiny(granularity)[0]
    rate = layer.keep_rate()
    kept = int((layer.popup_scores > 0).sum()) * (layer.weight.numel() // layer.popup_scores.numel())
    assert float(rate.detach()) == pytest.approx(kept / layer.weight.numel(), abs=1e-7)
    assert kept == layer.kept_count()
    rate.backward()
    expected = gate_slope(layer.popup_scores.detach()) / layer.popup_scores.numel()
    assert torch.allclose(layer.popup_scores.grad, expected)


def test_every_layer_keeps_its_floor_of_gates():
    model = tiny("weight", keep_min=0.05)
    with torch.no_grad():
        for _, layer in masked_layers(model):
            layer.popup_scores.fill_(-1.0)
            layer.popup_scores.view(-1)[3] = -0.5  # the largest logit is kept first
    conv = model[0]
    assert conv.kept_count() == 4 and conv.mask().view(-1)[3] == 1  # 5 % of 72 weights, rounded up
    assert model[3].kept_count() == 16  # 5 % of 320


@pytest.mark.parametrize("granularity,target", [("weight", 0.3), ("channel", 0.5)])
def test_the_projection_fills_the_budget_from_above_and_from_below(granularity, target):
    model = tiny(granularity)
    cost_model = CostModel(model, inspect_layers(model, EXAMPLE), granularity, target)
    layers = cost_model.layers
    for start in (2.0, -2.0):  # most gates open (over budget), then most closed (under budget)
        with torch.no_grad():
            for gates in unique_gates(layers):
                gates.add_(start - gates.mean())
        assert project_to_target(cost_model) is not None
        cost = float(cost_model.soft_cost())
        assert cost <= cost_model.target + 1e-12
        logits = torch.cat([layer.popup_scores.detach().flatten() for layer in layers])
        opened, closed = logits[logits > 0], logits[logits <= 0]
        assert closed.numel() and opened.numel()
        # maximal: opening the best closed gate as well breaks the budget
        best_closed = float(closed.max())
        with torch.no_grad():
            for gates in unique_gates(layers):
                gates.sub_(best_closed - 1e-6)
        assert float(cost_model.soft_cost()) > cost_model.target
        with torch.no_grad():
            for gates in unique_gates(layers):
                gates.add_(best_closed - 1e-6)
        assert project_to_target(cost_model) is None  # already projected: nothing to do
    if granularity == "weight":
        assert on_budget(cost, cost_model.target) and cost >= (1 - BUDGET_TOLERANCE) * target


@pytest.mark.parametrize("floor", [True, False])
def test_the_budget_floor_reopens_gates_only_when_the_cost_falls_far_under_the_target(floor):
    model = tiny("weight")
    cost_model = CostModel(model, inspect_layers(model, EXAMPLE), "weight", 0.3)
    loss = GateBudgetLoss(cost_model, floor=floor)
    gates = unique_gates(cost_model.layers)
    with torch.no_grad():
        for g in gates:
            g.sub_(g.mean() + 3.0)  # almost every gate closed: far under the budget
    under = float(cost_model.soft_cost().detach())
    assert under < (1 - BUDGET_TOLERANCE) * 0.3
    loss.after_step()
    cost = float(cost_model.soft_cost().detach())
    if floor:
        assert on_budget(cost, 0.3)
        snapshot = [g.detach().clone() for g in gates]
        loss.after_step()  # on budget: nothing moves
        assert all(torch.equal(a, g) for a, g in zip(snapshot, gates))
    else:
        assert cost == under


class TwoReaders(nn.Module):
    """Two convs read the same tensor (a block's conv1 and its shortcut)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 1)
        self.conv1, self.shortcut = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        return (self.conv1(h) + self.shortcut(h)).mean(dim=(2, 3))


def test_tied_channel_gates_share_one_parameter():
    model = TwoReaders()
    sparsify(model, "channel", keep_min=0.0, kind=MASKS_GATES)
    ties = tie_gates(model, inspect_layers(model, EXAMPLE).tie_groups)
    assert ties == {"shortcut": "conv1"}
    assert model.shortcut.popup_scores is model.conv1.popup_scores
    with torch.no_grad():
        model.conv1.popup_scores.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 4, 1, 1))
    assert torch.equal(model.shortcut.mask(), model.conv1.mask())
    assert len(unique_gates([model.conv1, model.shortcut])) == 1


# ----------------------------------------------------------------------------------------------- end to end
K, TARGET_REL = 0.3, 0.05


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in fh]


def test_intrain_reaches_its_budget_resumes_exactly_and_evaluates(tmp_path, monkeypatch):
    base = ["--dataset", "digits", "--trainer", "base", "--val-method", "base", "--data-fraction", "0.3",
            "--result-dir", str(tmp_path), "--no-progress", "--k", str(K)]
    intrain = base + ["--exp-mode", "intrain", "--epochs", "4", "--gate-settle-epochs", "2"]
    assert train.main(intrain + ["--exp-name", "clean"]) == 0

    original_save = train.Run.save
    crashes = {1, 3}  # once in the budget-loss phase, once in the settle phase

    def crash(self, epoch, is_best, finished):
        original_save(self, epoch, is_best, finished)
        if epoch in crashes:
            crashes.discard(epoch)
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Run, "save", crash)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            train.main(intrain + ["--exp-name", "crashed"])
    monkeypatch.setattr(train.Run, "save", original_save)
    assert train.main(intrain + ["--exp-name", "crashed"]) == 0

    root = os.path.join(str(tmp_path), "small_cnn", "digits", "nat")
    clean_dir = os.path.join(root, "clean", "intrain")
    clean = metrics(clean_dir)
    assert metrics(os.path.join(root, "crashed", "intrain")) == clean and len(clean) == 4
    last = clean[-1]
    for key in ("keep", "per_layer_keep", "hw_loss", "soft_cost", "gamma", "target_met"):
        assert key in last
    assert [r.get("gates_frozen", False) for r in clean] == [False, False, True, True]
    assert last["target_met"] and abs(last["keep"] / K - 1) <= TARGET_REL  # parameter budget: keep = cost

    best = load_checkpoint(os.path.join(clean_dir, "checkpoint", "model_best.pth.tar"))
    assert best["history"][-1]["target_met"]
    test_py = load_entry_point("test.py", "harp_test_entry")
    results = {}
    for which in ("best", "best_dense"):
        results[which] = str(tmp_path / f"{which}.json")
        assert test_py.main(base + ["--exp-mode", "intrain", "--exp-name", "clean", "--checkpoint", which,
                                    "--attacks", "natural,pgd10", "--results-file", results[which]]) == 0
    with open(results["best"]) as fh:
        masked = json.load(fh)
    with open(results["best_dense"]) as fh:
        dense = json.load(fh)
    assert masked["sparsity"]["kept"] == dense["sparsity"]["kept"] == best["sparsity"]["kept"]
    assert abs(masked["sparsity"]["global_keep"] / K - 1) <= TARGET_REL
    assert masked["natural_acc"] == dense["natural_acc"]
    assert masked["attacks"]["pgd10"]["robust_acc"] == dense["attacks"]["pgd10"]["robust_acc"]
    assert method_of("intrain") == ("in-train", False) and method_of("intrain_finetune") == ("in-train", True)

    assert train.main(base + ["--exp-mode", "intrain_finetune", "--exp-name", "clean", "--epochs", "1"]) == 0
    finetuned = load_checkpoint(os.path.join(root, "clean", "intrain_finetune", "checkpoint", "checkpoint.pth.tar"))
    assert finetuned["sparsity"]["per_layer"] == best["sparsity"]["per_layer"]  # the in-train masks, frozen
    layer_masks = {k: v for k, v in finetuned["state_dict"].items() if k.endswith("popup_scores")}
    assert all(torch.equal(v, best["state_dict"][k]) for k, v in layer_masks.items())


@pytest.mark.parametrize("mode,gated", [("intrain", True), ("intrain_finetune", True), ("harp_prune", False)])
def test_the_model_of_a_mode_has_its_recipes_mask_kind(mode, gated):
    cfg = resolve_config(["--exp-mode", mode, "--k", "0.1"], "test", "test.py")[0]
    info = load_data(cfg, torch.device("cpu")).info
    model = build_model(dataclasses.replace(cfg, num_classes=10), info, torch.device("cpu"), masked=True)
    assert all(isinstance(layer, GateMixin) == gated for _, layer in masked_layers(model))
