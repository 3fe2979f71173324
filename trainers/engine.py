"""One training epoch: PGD/TRADES/MART/natural objectives (`train_one_epoch`) and Free-AT (`train_one_epoch_free`).

Both minimise the objective's loss plus every regularizer's weighted term (e.g. HARP's gamma * hardware loss)
and return plain dicts of averages (`<regularizer name>_mean` for each term); the entry point logs and saves them.
Metrics accumulate on the device and are read every `print_freq` steps (progress bar and the finite-loss check)
and at the end, so the step itself never waits for the host.
"""
import contextlib
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.errors import UserError
from trainers.objectives import Objective, ObjectiveSettings, get_objective
from trainers.regularizers import Regularizer
from utils.progress import progress


class _Totals:
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


def _backward(optimizer: torch.optim.Optimizer, loss: torch.Tensor,
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


def _autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_one_epoch(model: nn.Module, attack_model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer,
                    objective: Objective, settings: ObjectiveSettings, *, epoch: int, num_batches: int,
                    device: torch.device, regularizers: Sequence[Regularizer] = (), bf16: bool = False,
                    channels_last: bool = False, print_freq: int = 10, show_progress: bool = True) -> Dict[str, float]:
    model.train()
    totals = _Totals(device, regularizers)
    bar = progress(batches, total=num_batches, desc=f"epoch {epoch + 1} train", enabled=show_progress)
    for step, (x, y) in enumerate(bar, start=1):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, bf16):
            loss, logits = objective(model, attack_model, x, y, settings)
        terms = _backward(optimizer, loss, regularizers)
        optimizer.step()
        totals.add(loss, logits, y, terms)
        if step % print_freq == 0:
            totals.check_finite(epoch, step)
            bar.set_postfix(loss=f"{float(totals.loss) / totals.count:.4f}",
                            acc=f"{100.0 * float(totals.correct) / totals.count:.1f}")
    totals.check_finite(epoch, totals.steps)
    return totals.summary()


class FreePerturbation:
    """Free-AT's perturbation (Shafahi et al. 2019). It persists across batches and across epochs, as in the
    paper (the original HARP code reset it every epoch); its state is saved in checkpoints."""

    def __init__(self, eps: float, clip_min: float = 0.0, clip_max: float = 1.0):
        self.eps, self.clip_min, self.clip_max = eps, clip_min, clip_max
        self.delta: Optional[torch.Tensor] = None

    def _for_batch(self, x: torch.Tensor) -> torch.Tensor:
        if self.delta is None or self.delta.shape[1:] != x.shape[1:] or self.delta.shape[0] < x.shape[0]:
            self.delta = torch.zeros_like(x)
        return self.delta[: x.shape[0]].detach().clone().requires_grad_(True)

    def step(self, delta: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            self.delta[: delta.shape[0]] = (delta + self.eps * grad.sign()).clamp(-self.eps, self.eps)

    def state_dict(self) -> Dict:
        return {"delta": None if self.delta is None else self.delta.detach().cpu()}

    def load_state_dict(self, state: Dict, device: torch.device) -> None:
        self.delta = None if state.get("delta") is None else state["delta"].to(device)


def train_one_epoch_free(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer,
                         perturbation: FreePerturbation, *, n_repeats: int, epoch: int, num_batches: int,
                         device: torch.device, regularizers: Sequence[Regularizer] = (), bf16: bool = False,
                         channels_last: bool = False, print_freq: int = 10,
                         show_progress: bool = True) -> Dict[str, float]:
    """Each batch is replayed `n_repeats` times; every replay is one forward/backward that yields both the
    parameter update and an eps-sized signed step of the persistent perturbation (regularizers per replay)."""
    model.train()
    totals = _Totals(device, regularizers)
    bar = progress(batches, total=num_batches, desc=f"epoch {epoch + 1} free-AT", enabled=show_progress)
    for step, (x, y) in enumerate(bar, start=1):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for _ in range(n_repeats):
            delta = perturbation._for_batch(x)
            with _autocast(device, bf16):
                logits = model((x + delta).clamp(perturbation.clip_min, perturbation.clip_max))
                loss = F.cross_entropy(logits, y)
            terms = _backward(optimizer, loss, regularizers)
            perturbation.step(delta, delta.grad)
            optimizer.step()
            totals.add(loss, logits, y, terms)
        if step % print_freq == 0:
            totals.check_finite(epoch, step)
            bar.set_postfix(loss=f"{float(totals.loss) / totals.count:.4f}")
    totals.check_finite(epoch, totals.steps)
    return totals.summary()


class ObjectiveLoop:
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
