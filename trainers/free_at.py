"""Free-AT (Shafahi et al., "Adversarial training for free!", NeurIPS 2019; `--trainer freeadv`): every batch is
replayed --n-repeats times, and each replay is one forward/backward that yields both the parameter update and an
eps-sized signed step of a perturbation that persists across replays, batches and epochs.

The perturbation is the loop's state: saved in every checkpoint (`state_key`) and restored on resume, so a resumed
run continues from the perturbation it stopped with. The epoch shares the running totals, the progress bar, the
regularized backward pass (the recipe's regularizers apply per replay) and bf16 autocast with every other loop
(trainers/engine.py).
"""
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.engine import EpochTotals, autocast, epoch_batches, regularized_backward
from trainers.protocols import TrainingLoop
from trainers.regularizers import Regularizer
from trainers.attacks.threat import ThreatModel


class FreePerturbation:
    """Free-AT's perturbation (Shafahi et al. 2019). It persists across batches and across epochs, as in the
    paper (the original HARP code reset it every epoch); its state is saved in checkpoints."""

    def __init__(self, eps: float, clip_min: float = 0.0, clip_max: float = 1.0):
        self.eps, self.clip_min, self.clip_max = eps, clip_min, clip_max
        self.delta: Optional[torch.Tensor] = None

    def for_batch(self, x: torch.Tensor) -> torch.Tensor:
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
    totals = EpochTotals(device, regularizers)
    for x, y in epoch_batches(batches, totals, epoch=epoch, num_batches=num_batches, desc="free-AT",
                              channels_last=channels_last, print_freq=print_freq, show_progress=show_progress):
        for _ in range(n_repeats):
            delta = perturbation.for_batch(x)
            with autocast(device, bf16):
                logits = model((x + delta).clamp(perturbation.clip_min, perturbation.clip_max))
                loss = F.cross_entropy(logits, y)
            terms = regularized_backward(optimizer, loss, regularizers)
            perturbation.step(delta, delta.grad)
            optimizer.step()
            totals.add(loss, logits, y, terms)
    return totals.summary()


class FreeATLoop(TrainingLoop):
    """--trainer freeadv: every batch replayed --n-repeats times, each replay one step of weights and perturbation."""

    state_key = "free_perturbation"

    def __init__(self, cfg, threat: ThreatModel, device: torch.device):
        self.perturbation = FreePerturbation(threat.eps, threat.clip_min, threat.clip_max)
        self.n_repeats = cfg.n_repeats
        self.device = device

    def train_epoch(self, model, attack_model, batches, optimizer, *, epoch: int, **common) -> Dict[str, float]:
        return train_one_epoch_free(model, batches, optimizer, self.perturbation, n_repeats=self.n_repeats,
                                    epoch=epoch, **common)

    def state_dict(self) -> Dict:
        return self.perturbation.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.perturbation.load_state_dict(state, self.device)
