"""Randomized smoothing (trainers/certify/smoothing.py): Clopper-Pearson bound, CERTIFY / PREDICT on toy models whose
smoothed classifier is known in closed form, certified-accuracy summaries, and Hydra's training losses.

The toy classifier is linear with two classes, z = (w.x + b, -(w.x + b)), so P(f(x + delta) = sign side) =
Phi(|w.x + b| / (sigma ||w||)) and Cohen's exact radius sigma * Phi^-1(pA) is the distance to the boundary.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import beta as beta_dist
from scipy.stats import binom, norm
from torch import nn

from trainers.certify.smoothing import (ABSTAIN, Certificate, average_certified_radius, certification_summary,
                                certified_accuracy, certify, clopper_pearson_lower, gaussian_augmentation_loss,
                                predict, sample_counts, smooth_loss, smoothed_validation)
from trainers.evaluation.scoring import accuracies

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMA = 0.25
BOUNDARY = 0.5  # the toy classifier says class 0 iff x_0 > BOUNDARY


def boundary_model() -> nn.Module:
    """Two-class linear classifier on 2-d inputs with decision boundary x_0 = BOUNDARY."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        model.bias.copy_(torch.tensor([-BOUNDARY, BOUNDARY]))
    return model


class ConstantModel(nn.Module):
    """Always predicts `label`, whatever the input."""

    def __init__(self, label: int, num_classes: int):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.logits = F.one_hot(torch.tensor(label), num_classes).float()

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0 * self.anchor


class RoundingModel(nn.Module):
    """Predicts class round(x_0): with tiny noise, point i with x_0 = i is always class i."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.centers = nn.Parameter(torch.arange(num_classes, dtype=torch.float32), requires_grad=False)

    def forward(self, x):
        return -(x[:, :1] - self.centers).abs()


# ----------------------------------------------------------------------------- Clopper-Pearson
@pytest.mark.parametrize("k, n, alpha", [(5, 10, 0.05), (990, 1000, 0.001), (1, 100, 0.01), (73, 200, 0.001)])
def test_clopper_pearson_is_the_beta_quantile_and_meets_its_definition(k, n, alpha):
    bound = float(clopper_pearson_lower(np.array([k]), n, alpha)[0])
    assert bound == pytest.approx(beta_dist.ppf(alpha, k, n - k + 1), rel=1e-12)
    # Definition: the smallest p with P(Binomial(n, p) >= k) >= alpha.
    assert binom.sf(k - 1, n, bound) == pytest.approx(alpha, rel=1e-6)
    assert bound < k / n


def test_clopper_pearson_edges():
    n, alpha = 50, 0.001
    bounds = clopper_pearson_lower(np.array([0, n]), n, alpha)
    assert bounds[0] == 0.0
    assert bounds[1] == pytest.approx(alpha ** (1 / n), rel=1e-12)  # P(all n successes) = p^n = alpha


# ----------------------------------------------------------------------------- sampling
def test_sample_counts_assigns_each_draw_to_its_point_across_batch_boundaries():
    num_classes, num = 4, 10
    x = torch.zeros(num_classes, 2)
    x[:, 0] = torch.arange(num_classes, dtype=torch.float32)
    # batch_size 7 does not divide 4 * 10: chunks hold parts of several points
    counts = sample_counts(RoundingModel(num_classes), x, sigma=1e-3, num=num, batch_size=7,
                           num_classes=num_classes)
    assert torch.equal(counts, num * torch.eye(num_classes, dtype=torch.int64))


# ----------------------------------------------------------------------------- CERTIFY / PREDICT
def test_certify_recovers_the_distance_to_a_linear_boundary():
    torch.manual_seed(0)
    offsets = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.4, -0.1, -0.25])
    x = torch.zeros(len(offsets), 2)
    x[:, 0] = BOUNDARY + offsets
    x[:, 1] = torch.rand(len(offsets))  # ignored by the classifier
    labels = (offsets < 0).long()
    n, alpha = 4000, 0.001
    cert = certify(boundary_model(), x, sigma=SIGMA, n0=100, n=n, alpha=alpha, batch_size=1000, num_classes=2)
    distance = offsets.abs().double()
    assert torch.equal(cert.prediction, labels)
    assert (cert.radius <= distance).all()  # a certificate never exceeds the true radius (w.p. 1 - alpha)
    assert (cert.radius >= distance - 0.05).all()  # and with n = 4000 it is close to it
    order = distance.argsort()
    assert (cert.radius[order].diff() > 0).all()  # farther from the boundary, larger radius
    grid = np.linspace(0, 0.5, 21)
    acc = [row["acc"] for row in certified_accuracy(cert.radius.numpy(), (cert.prediction == labels).numpy(), grid)]
    assert acc[0] == 100.0 and all(a >= b for a, b in zip(acc, acc[1:])) and acc[-1] == 0.0


def test_certify_and_predict_abstain_on_a_tie():
    torch.manual_seed(1)
    x = torch.tensor([[BOUNDARY, 0.3], [BOUNDARY, 0.9]])  # exactly on the boundary: pA = 1/2
    cert = certify(boundary_model(), x, sigma=SIGMA, n0=100, n=2000, alpha=0.001, batch_size=512, num_classes=2)
    assert cert.prediction.tolist() == [ABSTAIN, ABSTAIN]
    assert cert.radius.tolist() == [0.0, 0.0]
    assert predict(boundary_model(), x, sigma=SIGMA, n=2000, alpha=0.001, batch_size=512,
                   num_classes=2).tolist() == [ABSTAIN, ABSTAIN]


def test_certify_constant_model_radius_is_the_closed_form():
    n, alpha, label = 1000, 0.001, 2
    model = ConstantModel(label, num_classes=5)
    cert = certify(model, torch.rand(3, 1, 4, 4), sigma=SIGMA, n0=10, n=n, alpha=alpha, batch_size=256,
                   num_classes=5)
    assert cert.prediction.tolist() == [label] * 3
    expected = SIGMA * norm.ppf(alpha ** (1 / n))  # all n draws agree: pA_lower = alpha^(1/n)
    assert cert.radius.numpy() == pytest.approx([expected] * 3, rel=1e-9)
    assert predict(model, torch.rand(3, 1, 4, 4), sigma=SIGMA, n=100, alpha=alpha, batch_size=64,
                   num_classes=5).tolist() == [label] * 3


def test_certify_restores_modes_and_predict_agrees_with_certify_far_from_the_boundary():
    torch.manual_seed(2)
    model = boundary_model().train()
    x = torch.tensor([[0.95, 0.0], [0.05, 1.0], [0.9, 0.5]])
    cert = certify(model, x, sigma=SIGMA, n0=50, n=500, alpha=0.001, batch_size=256, num_classes=2)
    pred = predict(model, x, sigma=SIGMA, n=500, alpha=0.001, batch_size=256, num_classes=2)
    assert model.training
    assert torch.equal(cert.prediction, pred) and pred.tolist() == [0, 1, 0]


# ----------------------------------------------------------------------------- summaries
def test_certified_accuracy_and_average_radius_by_hand():
    radii = [0.0, 0.3, 0.6, 1.0, 0.0]
    correct = [True, True, False, True, False]
    rows = certified_accuracy(radii, correct, [0.0, 0.5, 1.0, 1.5])
    assert rows == [{"radius": 0.0, "acc": 60.0}, {"radius": 0.5, "acc": 20.0}, {"radius": 1.0, "acc": 20.0},
                    {"radius": 1.5, "acc": 0.0}]
    assert average_certified_radius(radii, correct) == pytest.approx((0.0 + 0.3 + 1.0) / 5)


def test_certification_summary_fields():
    labels = torch.tensor([0, 1, 1, 0])
    cert = Certificate(prediction=torch.tensor([0, ABSTAIN, 1, 1]), radius=torch.tensor([0.5, 0.0, 0.2, 0.4],
                                                                                          dtype=torch.float64))
    summary = certification_summary(labels, cert, torch.tensor([0, 1, ABSTAIN, 1]), radius_grid=[0.0, 0.25])
    assert summary["certified_accuracy"] == [{"radius": 0.0, "acc": 50.0}, {"radius": 0.25, "acc": 25.0}]
    assert summary["average_certified_radius"] == pytest.approx(0.7 / 4)
    assert summary["certify_abstain_rate"] == 25.0
    assert summary["prediction_acc"] == 50.0 and summary["predict_abstain_rate"] == 25.0


# ----------------------------------------------------------------------------- training losses
def _tiny_classifier():
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def test_smooth_loss_is_ce_plus_beta_kl_from_clean_to_noisy():
    model = _tiny_classifier()
    x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    torch.manual_seed(10)
    loss, logits = smooth_loss(model, x, y, sigma=SIGMA, beta=6.0)
    torch.manual_seed(10)
    noisy = model(x + SIGMA * torch.randn_like(x))
    p, q = F.softmax(model(x), dim=1), F.softmax(noisy, dim=1)
    kl = (p * (p.log() - q.log())).sum(dim=1).mean()  # KL(p(x) || p(x + delta)), mean over the batch
    assert torch.allclose(logits, model(x))
    assert loss.item() == pytest.approx((F.cross_entropy(model(x), y) + 6.0 * kl).item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_smooth_loss_without_noise_is_plain_cross_entropy():
    model = _tiny_classifier()
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([2, 1, 0, 0])
    loss, _ = smooth_loss(model, x, y, sigma=0.0, beta=6.0)
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), abs=1e-6)


def test_gaussian_augmentation_loss_is_ce_on_noisy_inputs():
    model = _tiny_classifier()
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([2, 1, 0, 0])
    torch.manual_seed(11)
    loss, logits = gaussian_augmentation_loss(model, x, y, sigma=SIGMA)
    torch.manual_seed(11)
    expected = model(x + SIGMA * torch.randn_like(x))
    assert torch.allclose(logits, expected)
    assert loss.item() == pytest.approx(F.cross_entropy(expected, y).item(), rel=1e-6)


# ----------------------------------------------------------------------------- per-epoch validation
def test_smoothed_validation_counts_the_smoothed_prediction():
    torch.manual_seed(4)
    model = boundary_model().train()
    # far from the boundary: smoothed = clean = label; near it on the wrong side: both wrong
    x = torch.tensor([[0.99, 0.0], [0.01, 0.0], [0.98, 0.3], [0.49, 0.0]])
    y = torch.tensor([0, 1, 0, 0])
    sums = smoothed_validation(model, [(x[:2], y[:2]), (x[2:], y[2:])], sigma=0.05, num_samples=10)
    result = accuracies(sums)
    assert model.training
    assert sums["n"] == 4
    assert result["natural_acc"] == 75.0 and result["robust_acc"] == 75.0
    assert math.isfinite(result["robust_loss"])
