"""Accuracy of a model on clean inputs and under an attack, over batches (validation and test.py)."""
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.attacks import eval_mode
from utils.progress import progress

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def evaluate(model: nn.Module, batches: Iterable, *, attack: Optional[Attack] = None, num_batches: int = None,
             desc: str = "eval", show_progress: bool = True) -> Dict[str, float]:
    """Sums (not means) so that results from several processes can be added: n, natural_correct,
    natural_loss_sum and, with an attack, robust_correct and robust_loss_sum. The model is in eval mode
    throughout and every module's mode is restored afterwards."""
    device = next(model.parameters()).device
    sums = {k: torch.zeros((), device=device, dtype=torch.float64)
            for k in ("n", "natural_correct", "natural_loss_sum", "robust_correct", "robust_loss_sum")}
    with eval_mode(model):
        for x, y in progress(batches, total=num_batches, desc=desc, enabled=show_progress):
            with torch.no_grad():
                logits = model(x)
            sums["n"] += y.shape[0]
            sums["natural_correct"] += (logits.argmax(dim=1) == y).sum()
            sums["natural_loss_sum"] += F.cross_entropy(logits, y, reduction="sum").double()
            if attack is not None:
                x_adv = attack(model, x, y)
                with torch.no_grad():
                    logits_adv = model(x_adv)
                sums["robust_correct"] += (logits_adv.argmax(dim=1) == y).sum()
                sums["robust_loss_sum"] += F.cross_entropy(logits_adv, y, reduction="sum").double()
    out = {k: float(v) for k, v in sums.items()}
    if attack is None:
        del out["robust_correct"], out["robust_loss_sum"]
    return out


def accuracies(sums: Dict[str, float]) -> Dict[str, float]:
    """Percentages from the sums of `evaluate`."""
    n = max(sums["n"], 1.0)
    out = {"natural_acc": 100.0 * sums["natural_correct"] / n, "natural_loss": sums["natural_loss_sum"] / n}
    if "robust_correct" in sums:
        out.update(robust_acc=100.0 * sums["robust_correct"] / n, robust_loss=sums["robust_loss_sum"] / n)
    return out
