"""The one pass over evaluation batches and the one project-and-score step, shared by per-epoch validation,
test.py's attacks and AutoAttack.

How a point is scored: an attack's output is first pulled back into the eps-ball and [clip_min, clip_max]
(a no-op for a valid point), so an attack that overshoots the budget by rounding or by a bug can never count a
point outside the threat model; the largest perturbation before and after is recorded. The model is in eval
mode throughout and every module's mode is restored afterwards.

Sums (counts, summed losses) stay on the device, so validation never waits for the host and several processes
can add them up; per-point predictions are collected on the CPU only when asked (test.py).
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.attacks.threat import ThreatModel, perturbation_norms, project
from utils.modes import eval_mode
from utils.progress import progress

Batches = Iterable[Tuple[torch.Tensor, torch.Tensor]]
BatchAttack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Rounding slack when checking an attack's raw output against eps.
EPS_SLACK = 1e-5


def project_to_threat(x_adv: torch.Tensor, x: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """x_adv pulled back into the threat model around x (a no-op for valid points)."""
    return project(x_adv.detach(), x.detach(), threat).detach()


def exceeds_budget(norm: float, eps: float) -> bool:
    return norm > eps * (1 + EPS_SLACK) + EPS_SLACK


@dataclass
class ScoredAdversarial:
    x_adv: torch.Tensor        # projected into the threat model
    logits: torch.Tensor
    raw_norm: torch.Tensor     # 0-dim, largest ||x_raw - x|| of the batch (float64, on the device)
    norm: torch.Tensor         # 0-dim, the same after projection


def project_and_score(model: nn.Module, x_raw: torch.Tensor, x: torch.Tensor, threat: ThreatModel) -> ScoredAdversarial:
    """The one scoring step: project an attack's output into the threat model and classify it (no grad)."""
    x_raw = x_raw.detach()
    x_adv = project_to_threat(x_raw, x, threat)
    with torch.no_grad():
        logits = model(x_adv)
    return ScoredAdversarial(x_adv, logits, perturbation_norms(x_raw, x, threat.norm).max(),
                             perturbation_norms(x_adv, x, threat.norm).max())


@dataclass
class PassResult:
    """What one pass measured. `sums` (on the device): n, natural_correct, natural_loss_sum and, with an attack,
    robust_correct, robust_loss_sum (adversarial top-1, as the original's validation counts it)."""
    sums: Dict[str, torch.Tensor]
    labels: Optional[torch.Tensor] = None          # int64 [n], CPU (collect=True)
    predictions: Optional[torch.Tensor] = None     # clean predictions, CPU (clean=True, collect=True)
    adv_predictions: Optional[torch.Tensor] = None  # CPU (attack given, collect=True)
    max_raw_norm: float = 0.0
    max_norm: float = 0.0
    _parts: Dict[str, List[torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def correct(self) -> torch.Tensor:
        return self.predictions == self.labels


def score_batches(model: nn.Module, batches: Batches, *, clean: bool = True, attack: Optional[BatchAttack] = None,
                  threat: Optional[ThreatModel] = None, collect: bool = False, num_batches: Optional[int] = None,
                  desc: str = "eval", show_progress: bool = True) -> PassResult:
    """One pass: per batch the clean logits (`clean`) and, with `attack`, its output projected and scored."""
    device = next(model.parameters()).device
    zero = lambda dtype=torch.float64: torch.zeros((), device=device, dtype=dtype)  # noqa: E731
    sums = {"n": zero()}
    if clean:
        sums.update(natural_correct=zero(), natural_loss_sum=zero())
    if attack is not None:
        sums.update(robust_correct=zero(), robust_loss_sum=zero())
    raw_norm, norm = zero(), zero()
    labels, preds, adv_preds = [], [], []
    with eval_mode(model):
        for x, y in progress(batches, total=num_batches, desc=desc, enabled=show_progress):
            sums["n"] += y.shape[0]
            if collect:
                labels.append(y.cpu())
            if clean:
                with torch.no_grad():
                    logits = model(x)
                sums["natural_correct"] += (logits.argmax(dim=1) == y).sum()
                sums["natural_loss_sum"] += F.cross_entropy(logits, y, reduction="sum").double()
                if collect:
                    preds.append(logits.argmax(dim=1).cpu())
            if attack is not None:
                scored = project_and_score(model, attack(x, y), x, threat)
                sums["robust_correct"] += (scored.logits.argmax(dim=1) == y).sum()
                sums["robust_loss_sum"] += F.cross_entropy(scored.logits, y, reduction="sum").double()
                raw_norm = torch.maximum(raw_norm, scored.raw_norm)
                norm = torch.maximum(norm, scored.norm)
                if collect:
                    adv_preds.append(scored.logits.argmax(dim=1).cpu())
    cat = lambda parts: torch.cat(parts) if parts else None  # noqa: E731
    return PassResult(sums, cat(labels), cat(preds), cat(adv_preds),
                      float(raw_norm) if attack is not None else 0.0, float(norm) if attack is not None else 0.0)


def accuracies(sums: Dict[str, float]) -> Dict[str, float]:
    """Percentages (and mean losses) from the sums of a pass."""
    n = max(float(sums["n"]), 1.0)
    out = {"natural_acc": 100.0 * float(sums["natural_correct"]) / n, "natural_loss": float(sums["natural_loss_sum"]) / n}
    if "robust_correct" in sums:
        out.update(robust_acc=100.0 * float(sums["robust_correct"]) / n, robust_loss=float(sums["robust_loss_sum"]) / n)
    return out


def accuracy(correct: torch.Tensor) -> float:
    return 100.0 * float(correct.sum()) / max(correct.numel(), 1)


def stderr(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy in percent."""
    p = acc / 100.0
    return 100.0 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def worst_case(clean: PassResult, adv_predictions: torch.Tensor) -> torch.Tensor:
    """Per-point prediction on the worst input found: a point counts as robust only if the model classifies it
    correctly both clean and under attack (the clean input lies inside every eps-ball), so robust accuracy never
    exceeds natural accuracy, as official AutoAttack counts it."""
    return torch.where(clean.correct, adv_predictions, clean.predictions)


def balanced_accuracy(labels: torch.Tensor, predictions: torch.Tensor) -> float:
    """sklearn's balanced_accuracy_score x 100 (the mean recall over the classes present in `labels`)."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected on small subsets
        warnings.simplefilter("ignore", UserWarning)
        return 100.0 * float(balanced_accuracy_score(labels.numpy(), predictions.numpy()))


def result_entry(settings, labels: torch.Tensor, worst_pred: torch.Tensor, seconds: float, params: Dict,
                 **extra) -> Dict:
    """One attack's entry of test.py's result JSON: robust accuracy of the worst-case predictions, its standard
    error, the threat model, the attack's parameters and timing."""
    acc = accuracy(worst_pred == labels)
    out = {"robust_acc": acc, "stderr": stderr(acc, labels.numel()), "eps": settings.threat.eps,
           "norm": settings.threat.norm}
    if settings.balanced:
        out["balanced_acc"] = balanced_accuracy(labels, worst_pred)
    out.update(params)
    out.update(extra)
    out["seconds"] = round(seconds, 3)
    return out
