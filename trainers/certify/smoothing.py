"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019) as Hydra uses it: training losses, per-epoch
validation estimate, and the CERTIFY / PREDICT certification of the smoothed classifier.

The smoothed classifier is g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I), with the noise added
to the raw [0, 1] input (models normalise inside), never clipped, as in Cohen et al.; sigma is in those [0, 1]
input units (Hydra's scripts use 0.25).

Hydra (github.com/inspire-group/hydra: trainer/smooth.py, utils/eval.py):
- training (`trainer/smooth.py`, non-ImageNet): CE(f(x), y) + beta * (1/B) * sum_i KL(p(x_i) || p(x_i + delta_i))
  with p = softmax(f); torch's KLDivLoss(log_softmax(f(x + delta)), softmax(f(x)), summed) / B. Both
  distributions carry gradients (the clean one is not detached); beta is the shared `--beta` (default 6).
  ImageNet uses plain CE on noisy inputs (`gaussian_augmentation_loss`).
- certification (`eval_smoothing.py`): CERTIFY with N0 = 100, N = 100,000 in Cohen's scripts (10,000 in
  Hydra's), alpha = 0.001; the one-sided Clopper-Pearson bound via statsmodels, here via scipy.stats.beta.
- per-epoch validation sums softmax over 10 noise draws; see `smoothed_validation` for what we do instead.
"""
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.modes import eval_mode

ABSTAIN = -1
# Cohen et al.'s CIFAR-10 radius grid (L2, input units).
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
VALIDATION_SAMPLES = 10  # Hydra's per-epoch noise draws per point


# ----------------------------------------------------------------------------- training losses
def smooth_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, sigma: float,
                beta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hydra's `smooth` objective: CE(f(x), y) + beta * KL(p(x) || p(x + delta)) / B, delta ~ N(0, sigma^2).

    Returns (loss, clean logits); the clean logits are what Hydra reports its training accuracy on. Two
    forwards in the model's current mode, as Hydra (BN statistics see the clean batch, then the noisy one).
    """
    logits = model(x)
    noisy_logits = model(x + sigma * torch.randn_like(x))
    stability = F.kl_div(F.log_softmax(noisy_logits, dim=1), F.softmax(logits, dim=1), reduction="sum")
    return F.cross_entropy(logits, y) + beta * stability / x.shape[0], logits


def gaussian_augmentation_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                               sigma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cohen et al.'s training (Hydra's ImageNet `smooth`): CE on x + delta. Returns (loss, noisy logits)."""
    logits = model(x + sigma * torch.randn_like(x))
    return F.cross_entropy(logits, y), logits


# ----------------------------------------------------------------------------- Monte Carlo sampling
def sample_counts(model: nn.Module, x: torch.Tensor, *, sigma: float, num: int, batch_size: int,
                  num_classes: int) -> torch.Tensor:
    """How often f(x_i + delta) predicts each class over `num` noise draws per point: int64 [B, num_classes].

    The B * num noisy copies are drawn and classified `batch_size` at a time on x's device, several points
    per forward when num < batch_size, and counted there (no host sync until the caller reads the counts).
    The model should already be in eval mode; the global torch RNG draws the noise.
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be positive, got {num} and {batch_size}")
    points = x.shape[0]
    counts = torch.zeros(points, num_classes, dtype=torch.int64, device=x.device)
    total = points * num
    with torch.no_grad():
        for start in range(0, total, batch_size):
            owner = torch.arange(start, min(start + batch_size, total), device=x.device) // num
            copies = x[owner]
            predictions = model(copies + sigma * torch.randn_like(copies)).argmax(dim=1)
            counts.index_put_((owner, predictions), torch.ones_like(predictions), accumulate=True)
    return counts


def _scipy_stats():
    """scipy.stats, imported on first use: importing it costs about a second, which every train.py run (this module
    is imported with the training loops) would pay otherwise."""
    import scipy.stats
    return scipy.stats


def clopper_pearson_lower(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion: Beta(alpha; k, n - k + 1).

    Equals statsmodels' proportion_confint(k, n, alpha=2 * alpha, method='beta')[0] that Cohen's code uses;
    0 where k = 0 (the beta quantile is undefined there).
    """
    successes = np.asarray(successes, dtype=np.float64)
    safe = np.maximum(successes, 1.0)
    return np.where(successes > 0, _scipy_stats().beta.ppf(alpha, safe, trials - successes + 1), 0.0)


# ----------------------------------------------------------------------------- CERTIFY / PREDICT
@dataclass(frozen=True)
class Certificate:
    """Per point: the smoothed prediction (ABSTAIN = -1) and its certified L2 radius (0 when abstaining)."""
    prediction: torch.Tensor  # int64 [B], on the CPU
    radius: torch.Tensor      # float64 [B], on the CPU, in input units


def certify(model: nn.Module, x: torch.Tensor, *, sigma: float, n0: int, n: int, alpha: float, batch_size: int,
            num_classes: int) -> Certificate:
    """Cohen et al.'s CERTIFY for every point of the batch x.

    Guess the top class c_A from n0 draws, count it again in n fresh draws, take the one-sided
    (1 - alpha) Clopper-Pearson lower bound pA_lower of P(f(x + delta) = c_A); abstain when pA_lower < 1/2,
    else certify radius sigma * Phi^-1(pA_lower). Model in eval mode (each module's mode restored after).
    """
    with eval_mode(model):
        selection = sample_counts(model, x, sigma=sigma, num=n0, batch_size=batch_size, num_classes=num_classes)
        guess = selection.argmax(dim=1)
        estimation = sample_counts(model, x, sigma=sigma, num=n, batch_size=batch_size, num_classes=num_classes)
    top_counts = estimation.gather(1, guess[:, None]).squeeze(1).cpu().numpy()
    p_lower = clopper_pearson_lower(top_counts, n, alpha)
    certified = p_lower >= 0.5
    radius = np.where(certified, sigma * _scipy_stats().norm.ppf(np.clip(p_lower, 0.5, 1.0)), 0.0)
    prediction = torch.where(torch.from_numpy(certified), guess.cpu(), torch.full_like(guess.cpu(), ABSTAIN))
    return Certificate(prediction=prediction, radius=torch.from_numpy(radius))


def predict(model: nn.Module, x: torch.Tensor, *, sigma: float, n: int, alpha: float, batch_size: int,
            num_classes: int) -> torch.Tensor:
    """Cohen et al.'s PREDICT: the top class of n draws, or ABSTAIN when the two-sided binomial test of
    n_top vs n_runner-up (p = 1/2) has p-value > alpha. Returns int64 [B] on the CPU."""
    if num_classes < 2:
        raise ValueError(f"PREDICT needs at least 2 classes, got {num_classes}")
    with eval_mode(model):
        counts = sample_counts(model, x, sigma=sigma, num=n, batch_size=batch_size, num_classes=num_classes)
    top2 = counts.topk(2, dim=1)
    values, classes = top2.values.cpu().tolist(), top2.indices[:, 0].cpu().tolist()
    predictions = []
    binomtest = _scipy_stats().binomtest
    for (first, second), top in zip(values, classes):
        significant = binomtest(first, first + second, p=0.5).pvalue <= alpha
        predictions.append(top if significant else ABSTAIN)
    return torch.tensor(predictions, dtype=torch.int64)


# ----------------------------------------------------------------------------- summaries
def certified_accuracy(radii: Sequence[float], correct: Sequence[bool],
                       radius_grid: Sequence[float] = DEFAULT_RADII) -> List[Dict[str, float]]:
    """Cohen et al.'s certified accuracy at each radius r: percent of points predicted correctly (not
    abstained) with certified radius >= r. Non-increasing in r by construction."""
    radii = np.asarray(radii, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    n = max(len(radii), 1)
    return [{"radius": float(r), "acc": 100.0 * float(np.sum(correct & (radii >= r))) / n} for r in radius_grid]


def average_certified_radius(radii: Sequence[float], correct: Sequence[bool]) -> float:
    """ACR (Zhai et al., MACER 2020): mean over all points of the certified radius, 0 for wrong or abstained."""
    radii = np.asarray(radii, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    return float(np.sum(np.where(correct, radii, 0.0)) / max(len(radii), 1))


def certification_summary(labels: torch.Tensor, certificate: Certificate, predictions: Optional[torch.Tensor],
                          radius_grid: Sequence[float] = DEFAULT_RADII) -> Dict[str, object]:
    """The result-JSON entry of a certification run over a test set (accuracies in percent)."""
    labels = labels.cpu()
    correct = (certificate.prediction == labels).numpy()
    n = max(len(labels), 1)
    summary: Dict[str, object] = {
        "certified_accuracy": certified_accuracy(certificate.radius.numpy(), correct, radius_grid),
        "average_certified_radius": average_certified_radius(certificate.radius.numpy(), correct),
        "certify_abstain_rate": 100.0 * float((certificate.prediction == ABSTAIN).sum()) / n,
    }
    if predictions is not None:
        summary["prediction_acc"] = 100.0 * float((predictions.cpu() == labels).sum()) / n
        summary["predict_abstain_rate"] = 100.0 * float((predictions.cpu() == ABSTAIN).sum()) / n
    return summary


# ----------------------------------------------------------------------------- per-epoch validation
def smoothed_validation(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *, sigma: float,
                        num_samples: int = VALIDATION_SAMPLES) -> Dict[str, float]:
    """A cheap per-epoch estimate of the smoothed classifier's accuracy (not a certificate).

    Like Hydra, `num_samples` noise draws per point (one forward of B * num_samples copies) and the argmax
    of the softmax averaged over them; Hydra summed the softmax and read a "radius" from that sum (> 1,
    so NaN/inf), which we do not report. Returns sums in the shape of trainers.evaluation.validation.validate, so
    `accuracies()` turns them into natural_acc (clean), robust_acc (smoothed) and robust_loss (NLL of the
    averaged softmax). Model in eval mode; each module's mode is restored after.
    """
    device = next(model.parameters()).device
    sums = {k: torch.zeros((), device=device, dtype=torch.float64)
            for k in ("n", "natural_correct", "natural_loss_sum", "robust_correct", "robust_loss_sum")}
    with eval_mode(model), torch.no_grad():
        for x, y in batches:
            logits = model(x)
            copies = x.repeat(num_samples, *([1] * (x.dim() - 1)))  # draw-major: copy k of point i at k*B + i
            noisy = F.softmax(model(copies + sigma * torch.randn_like(copies)), dim=1)
            probs = noisy.view(num_samples, x.shape[0], -1).mean(dim=0)
            sums["n"] += y.shape[0]
            sums["natural_correct"] += (logits.argmax(dim=1) == y).sum()
            sums["natural_loss_sum"] += F.cross_entropy(logits, y, reduction="sum").double()
            sums["robust_correct"] += (probs.argmax(dim=1) == y).sum()
            sums["robust_loss_sum"] += F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum").double()
    return {k: float(v) for k, v in sums.items()}
