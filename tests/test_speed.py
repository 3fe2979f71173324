"""Speed rules (docs/speed.md, "What makes it fast") that can be checked exactly, without a clock.

- A mask is computed once per optimizer step (scores and rates trainable: harp_prune), never once per
  forward: the 10 PGD forwards and the training forward of a step reuse it. With frozen masks (finetune)
  no mask is computed during a step at all.
- A PGD-10 training step runs 11 forwards (10 attack + 1 training), no extra one for logging.
- The attack takes gradients with respect to the input only: parameter .grad stays untouched.
"""
import pytest
import torch

import pruning.layers
import pruning.masks
from models import create_model
from pruning.budget import CostModel
from pruning.graph import inspect_layers
from pruning.init import init_scores_from_weights, set_keep_rates
from pruning.trainable import set_trainable
from pruning.wrap import freeze_masks, masked_layers, sparsify
from trainers.attacks.pgd import pgd
from trainers.attacks.threat import ThreatModel
from trainers.engine import train_one_epoch
from trainers.objectives import ObjectiveSettings, pgd_at
from trainers.regularizers import HardwareLoss

K = 0.1
SETTINGS = ObjectiveSettings(threat=ThreatModel(eps=0.031, step_size=0.0078, steps=10))
CPU = torch.device("cpu")


@pytest.fixture
def mask_calls(monkeypatch):
    """Counts calls of the one mask function, under both names it is reached by (channel masks call it too)."""
    calls = []
    original = pruning.masks.top_mask

    def counting(scores, kept):
        calls.append(scores.numel())
        return original(scores, kept)

    monkeypatch.setattr(pruning.masks, "top_mask", counting)
    monkeypatch.setattr(pruning.layers, "top_mask", counting)
    return calls


def prune_model(granularity):
    """small_cnn set up as train.py sets up harp_prune: masked, scaled scores, 010_uni rates, W frozen."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    sparsify(model, granularity, keep_min=0.1 * K)
    cost = CostModel(model, inspect_layers(model, torch.zeros(1, 1, 8, 8)), granularity, K)
    init_scores_from_weights(model)
    set_keep_rates(model, {name: 0.5 for name, _ in masked_layers(model)})
    set_trainable(model, weights=False, scores=True, rates=True, norm_layers=True)
    return model, cost


def batches(n, batch_size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch_size, 1, 8, 8, generator=gen), torch.randint(0, 10, (batch_size,), generator=gen))
            for _ in range(n)]


def step(model, data, optimizer, cost=None):
    return train_one_epoch(model, model, data, optimizer, pgd_at, SETTINGS, epoch=0, num_batches=len(data),
                           device=CPU, regularizers=[HardwareLoss(cost, weight=1.0)] if cost else [],
                           show_progress=False)


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_harp_prune_step_computes_each_mask_once(granularity, mask_calls):
    model, cost = prune_model(granularity)
    layers = len(masked_layers(model))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    scores_before = [layer.popup_scores.detach().clone() for _, layer in masked_layers(model)]
    mask_calls.clear()
    step(model, batches(1), optimizer, cost)
    assert len(mask_calls) == layers  # 11 forwards, one mask per layer
    # ... and again in the next step, because the optimizer step changed the scores and rates
    mask_calls.clear()
    step(model, batches(1, seed=1), optimizer, cost)
    assert len(mask_calls) == layers
    assert any(not torch.equal(a, layer.popup_scores) for a, (_, layer) in zip(scores_before, masked_layers(model)))
    # three steps in one epoch: three masks per layer
    mask_calls.clear()
    step(model, batches(3, seed=2), optimizer, cost)
    assert len(mask_calls) == 3 * layers


def test_finetune_step_computes_no_mask(mask_calls):
    model, _ = prune_model("weight")
    set_trainable(model, weights=True, scores=False, rates=False, norm_layers=True)
    freeze_masks(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    mask_calls.clear()
    step(model, batches(2), optimizer)
    assert mask_calls == []
    for _, layer in masked_layers(model):  # the pruned weights stayed zero through the updates
        assert torch.equal(layer.weight.detach() * (1 - layer.mask()), torch.zeros_like(layer.weight))


def test_pgd10_step_runs_eleven_forwards():
    model, cost = prune_model("weight")
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    step(model, batches(1), optimizer, cost)
    assert len(forwards) == 10 + 1


def test_attack_takes_input_gradients_only():
    model, _ = prune_model("weight")
    set_trainable(model, weights=True, scores=True, rates=True, norm_layers=True)
    (x, y), = batches(1)
    x_adv = pgd(model, x, y, SETTINGS.threat)
    assert all(p.grad is None for p in model.parameters())
    assert (x_adv - x).abs().max() <= SETTINGS.threat.eps + 1e-6 and not torch.equal(x_adv, x)
