"""Fast-AT (`--trainer fast`, trainers/fast_at.py): one FGSM step of 1.25 eps from a uniform random start, the
catastrophic-overfitting guard on epoch records, and the trainer running as a stage with its own run directory."""
import logging
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from configs.cli import resolve_config
from configs.errors import UserError
from stage import option_choices
from trainers.attacks.threat import ThreatModel
from trainers.fast_at import FastATLoop, OverfitGuard, fast_at, fast_threat
from trainers.objectives import ObjectiveSettings
from utils.checkpoint import load_checkpoint
from utils.run_dir import checkpoint_path, run_dir

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.1
THREAT = ThreatModel(eps=EPS, step_size=0.025, steps=10)


class CountingLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.fc(x.flatten(1))


def resolve(*argv):
    return resolve_config(list(argv), "train", "train.py", choices=option_choices())[0]


def test_the_fast_step_is_one_fgsm_step_of_1_25_eps_from_a_uniform_random_start():
    torch.manual_seed(0)
    model = CountingLinear()
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    settings = ObjectiveSettings(threat=fast_threat(THREAT))
    assert settings.threat.steps == 1 and settings.threat.step_size == pytest.approx(1.25 * EPS)

    torch.manual_seed(1)
    loss, logits = fast_at(model, model, x, y, settings)
    attacked, trained = model.inputs  # one attack forward and one training forward, nothing else
    # the same draw by hand: uniform start in the eps-ball clamped to [0, 1], one signed gradient step, projection
    torch.manual_seed(1)
    start = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    assert torch.equal(attacked, start)
    start.requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model.fc(start.flatten(1)), y, reduction="sum"), [start])
    expected = torch.min(torch.max(start + 1.25 * EPS * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    assert torch.allclose(trained, expected, atol=1e-7)
    assert (trained - x).abs().max() <= EPS + 1e-6 and torch.equal(logits, model.fc(trained.flatten(1)))
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item())


def test_the_loop_presets_its_own_step_and_takes_an_explicit_one():
    loop = FastATLoop(resolve("--trainer", "fast"), THREAT, torch.device("cpu"))
    assert loop.settings.threat.step_size == pytest.approx(1.25 * EPS) and loop.settings.threat.random_start
    assert "overfit_guard" in loop.hooks
    loop = FastATLoop(resolve("--trainer", "fast", "--fast-step", "0.05"), THREAT, torch.device("cpu"))
    assert loop.settings.threat.step_size == 0.05
    with pytest.raises(UserError, match="--adv_loss trades does not apply"):
        FastATLoop(resolve("--trainer", "fast", "--adv-loss", "trades"), THREAT, torch.device("cpu"))


def _history(guard, records):
    for epoch, (robust, fgsm) in enumerate(records):
        guard.before_epoch(epoch)
        guard.after_epoch(epoch, {"epoch": epoch + 1, "robust_acc": robust, "train_acc": fgsm})


def test_the_guard_warns_when_pgd_accuracy_collapses_while_fgsm_accuracy_rises(caplog):
    guard = OverfitGuard("warn", drop=20.0)
    with caplog.at_level(logging.WARNING, logger="trainers.fast_at"):
        # PGD falls 8 points (noise, no collapse), then collapses to 5 % while FGSM training accuracy climbs
        _history(guard, [(40.0, 45.0), (48.0, 50.0), (40.0, 52.0), (5.0, 80.0), (3.0, 85.0)])
    assert guard.collapsed_at == 4
    assert "catastrophic overfitting in epoch 4" in caplog.text and "epoch 3:" not in caplog.text
    restored = OverfitGuard("warn", drop=20.0)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()


def test_the_guard_stays_quiet_when_fgsm_accuracy_falls_too_or_when_off():
    guard = OverfitGuard("stop", drop=20.0)
    _history(guard, [(60.0, 70.0), (30.0, 40.0), (35.0, 45.0)])  # everything got worse: not overfitting
    assert guard.collapsed_at is None
    off = OverfitGuard("off", drop=20.0)
    _history(off, [(40.0, 45.0), (5.0, 80.0)])
    assert off.collapsed_at is None


def test_the_guard_stops_the_run_before_the_next_epoch():
    guard = OverfitGuard("stop", drop=20.0)
    _history(guard, [(40.0, 45.0), (5.0, 80.0)])  # the collapsed epoch itself finishes (and is saved)
    with pytest.raises(UserError, match="catastrophic overfitting in epoch 2"):
        guard.before_epoch(2)


def test_fast_trainer_pretrains_in_its_own_run_directory_with_the_guard_state(tmp_path):
    argv = ["--dataset", "digits", "--trainer", "fast", "--exp-mode", "pretrain", "--epochs", "2",
            "--data-fraction", "0.3", "--result-dir", str(tmp_path), "--no-progress"]
    assert train.main(argv) == 0
    cfg = resolve(*argv)
    directory = run_dir(cfg)
    assert os.path.join("digits", "fast", "pretrain") in directory
    ckpt = load_checkpoint(checkpoint_path(directory, "last"))
    assert ckpt["overfit_guard"]["best_robust"] == max(r["robust_acc"] for r in ckpt["history"])
