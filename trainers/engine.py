"""One training epoch on an objective (`train_one_epoch`: PGD/TRADES/MART/natural, Fast-AT, the certified
objectives) and the loop that picks the objective per epoch (`ObjectiveLoop`). The running totals, the epoch's
batches under a progress bar, the regularized backward pass and bf16 autocast are shared with Free-AT's replayed
epoch (trainers/free_at.py).

Every epoch minimises the objective's loss plus every regularizer's weighted term (e.g. HARP's gamma * hardware loss)
and returns a plain dict of averages (`<regularizer name>_mean` for each term); the entry point logs and saves them.
Metrics accumulate on the device and are read every `print_freq` steps (progress bar and the finite-loss check)
and at the end, so the step itself never waits for the host.
"""
import contextlib
from typing import Dict, Iterable, Iterator, Sequence, Tuple

import torch
import torch.nn as nn

from configs.errors import UserError
from trainers.objectives import Objective, ObjectiveSettings, get_objective
from trainers.protocols import TrainingLoop
from trainers.regularizers import Regularizer
from utils.progress import progress


class EpochTotals:
    """Running sums kept on the device."""

    def __init__(self, device, regularizers: Sequence[Regularizer]):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.terms = {r.name: torch.zeros((), device=device, dtype=torch.float64) for r in regularizers}
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.count = 0
        self.steps = 0

    def add(self, loss, logits, y, terms: Dict[str, torch.Tensor]):
        n = y.shape[0]
        self.loss += loss.detach().double() * n
        self.correct += (logits.detach().argmax(dim=1) == y).sum()
        for name, value in terms.items():
            self.terms[name] += value.detach().double()
        self.count += n
        self.steps += 1

    def check_finite(self, epoch: int, step: int) -> None:
        value = float(self.loss)
        if value != value or value in (float("inf"), float("-inf")):
            raise UserError(f"training loss became {value} in epoch {epoch + 1} by step {step}; stopped, and the "
                            "last good checkpoint is kept (try a lower --lr)")

    def summary(self) -> Dict[str, float]:
        out = {"train_loss": float(self.loss) / max(self.count, 1),
               "train_acc": 100.0 * float(self.correct) / max(self.count, 1), "train_examples": self.count}
        for name, value in self.terms.items():
            out[f"{name}_mean"] = float(value) / max(self.steps, 1)
        return out


def regularized_backward(optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                         regularizers: Sequence[Regularizer]) -> Dict[str, torch.Tensor]:
    """Gradients of loss + sum of weight * term over the regularizers; returns each unweighted term."""
    terms = {}
    total = loss
    for regularizer in regularizers:
        terms[regularizer.name] = regularizer()
        total = total + regularizer.weight * terms[regularizer.name]
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    return terms


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on `device` with --bf16, else nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def epoch_batches(batches: Iterable, totals: EpochTotals, *, epoch: int, num_batches: int, desc: str,
                  channels_last: bool, print_freq: int,
                  show_progress: bool) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's (x, y) batches (x channels_last if asked) under a progress bar. Every `print_freq` steps, once the
    caller has processed the batch, and at the end the running loss is read: the bar's figures and the finite-loss
    check (the epoch's only host reads)."""
    bar = progress(batches, total=num_batches, desc=f"epoch {epoch + 1} {desc}", enabled=show_progress)
    for step, (x, y) in enumerate(bar, start=1):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y
        if step % print_freq == 0:
            totals.check_finite(epoch, step)
            bar.set_postfix(loss=f"{float(totals.loss) / totals.count:.4f}",
                            acc=f"{100.0 * float(totals.correct) / totals.count:.1f}")
    totals.check_finite(epoch, totals.steps)


def train_one_epoch(model: nn.Module, attack_model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer,
                    objective: Objective, settings: ObjectiveSettings, *, epoch: int, num_batches: int,
                    device: torch.device, regularizers: Sequence[Regularizer] = (), bf16: bool = False,
                    channels_last: bool = False, print_freq: int = 10, show_progress: bool = True) -> Dict[str, float]:
    model.train()
    totals = EpochTotals(device, regularizers)
    for x, y in epoch_batches(batches, totals, epoch=epoch, num_batches=num_batches, desc="train",
                              channels_last=channels_last, print_freq=print_freq, show_progress=show_progress):
        with autocast(device, bf16):
            loss, logits = objective(model, attack_model, x, y, settings)
        terms = regularized_backward(optimizer, loss, regularizers)
        optimizer.step()
        totals.add(loss, logits, y, terms)
    return totals.summary()


class ObjectiveLoop(TrainingLoop):
    """One optimizer step per batch on an objective: --warmup-loss for the first --warmup-epochs, then the loop's
    main objective (here --adv-loss: natural, PGD-AT, TRADES, MART). A loop with another main objective or other
    settings (Fast-AT, randomized smoothing) subclasses it and overrides `main_objective` / the settings."""

    def __init__(self, cfg, threat, device: torch.device):
        self.settings = ObjectiveSettings(threat=threat, beta=cfg.beta)
        self.warmup_settings = self.settings
        self.adv_loss, self.warmup_loss, self.warmup_epochs = cfg.adv_loss, cfg.warmup_loss, cfg.warmup_epochs

    def main_objective(self) -> Objective:
        return get_objective(self.adv_loss)

    def train_epoch(self, model, attack_model, batches, optimizer, *, epoch: int, **common) -> Dict[str, float]:
        if epoch < self.warmup_epochs:
            objective, settings = get_objective(self.warmup_loss), self.warmup_settings
        else:
            objective, settings = self.main_objective(), self.settings
        return train_one_epoch(model, attack_model, batches, optimizer, objective, settings, epoch=epoch, **common)
