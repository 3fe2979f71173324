"""MixTrain (Wang et al. 2018, "MixTrain: Scalable Training of Verifiably Robust Neural Networks") as Hydra's
trainer/mixtrain.py runs it: `--trainer mixtrain`, in every exp-mode.

Per batch the loss is the clean cross-entropy; with probability MIXTRAIN_PROBABILITY (0.8) it also has
iw x the robust cross-entropy of --mixtrain-k points drawn with replacement from the batch, their worst-case logits
bounded by symbolic interval analysis (trainers/certify/bounds.py, `sym`) over the Linf ball of the epoch's eps.

Per-epoch schedules, with t = epoch - --schedule-start (Hydra has no schedule start: its t is the epoch):
    eps_t = --starting-epsilon + t (--epsilon - --starting-epsilon) / --schedule-length   while t < --schedule-length
            --epsilon                                                                      afterwards
    iw_t  = --interval-weight * 2.5 ** (max(t - --schedule-length, 0) // 5), at most 50

Validation: symbolic-verified accuracy at --epsilon (Hydra's --val_method mixtrain). The training accuracy is the
clean one (Hydra's); the epoch's record adds `mixtrain_eps`, `mixtrain_iw`, `sym_batches` (the fraction of batches
with the symbolic term), `sym_loss` (its mean) and `sym_acc` (percent of drawn points verified at eps_t).

State: none across epochs. eps_t and iw_t are functions of the epoch, and the coin and the drawn points come from a
generator seeded by (--seed, epoch), independent of every other random stream, so a run resumed after any epoch
draws exactly what the uninterrupted run draws.
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from configs.errors import UserError
from trainers.attacks.threat import LINF, ThreatModel
from trainers.certified_training import bounded_module
from trainers.certify.bounds import SYMBOLIC, bound_steps, worst_case_loss
from trainers.engine import train_one_epoch
from trainers.objectives import ObjectiveSettings
from trainers.protocols import TrainingLoop
from utils.seed import epoch_seed

MIXTRAIN_PROBABILITY = 0.8              # Hydra's (and MixTrain's) alpha: share of batches with the symbolic term
WEIGHT_GROWTH, WEIGHT_EVERY, MAX_WEIGHT = 2.5, 5, 50.0
_DRAW_STREAM = 0x6D697874               # keeps the draws apart from the epoch's global seed


def mixtrain_schedule(epoch: int, *, eps: float, interval_weight: float, schedule_length: int,
                      schedule_start: int = 0, starting_eps: float = 0.0) -> Tuple[float, float]:
    """(eps_t, iw_t) of 0-based `epoch` (see the module docstring)."""
    t = max(epoch - schedule_start, 0)
    if t < schedule_length:
        eps_t = starting_eps + t * (eps - starting_eps) / schedule_length
    else:
        eps_t = eps
    weight = interval_weight * WEIGHT_GROWTH ** (max(t - schedule_length, 0) // WEIGHT_EVERY)
    return eps_t, min(weight, MAX_WEIGHT)


def epoch_draws(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch's coin flips and drawn points."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch) ^ _DRAW_STREAM)


class _MixTrainObjective:
    """The objective of one epoch: clean CE + (with probability 0.8) iw x symbolic robust CE on k drawn points."""

    def __init__(self, loop: "MixTrainLoop", epoch: int, device: torch.device):
        self.eps, self.weight = loop.schedule(epoch)
        self.k = loop.k
        self.draws = epoch_draws(loop.seed, epoch)
        self.batches = 0
        self.symbolic_batches = 0
        self.symbolic_loss = torch.zeros((), device=device, dtype=torch.float64)
        self.verified = torch.zeros((), device=device, dtype=torch.int64)

    def __call__(self, model, attack_model, x, y, settings: ObjectiveSettings) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        self.batches += 1
        if float(torch.rand((), generator=self.draws)) < MIXTRAIN_PROBABILITY:
            picks = torch.randint(0, x.shape[0], (self.k,), generator=self.draws).to(x.device)
            threat = settings.threat
            robust, worst_logits = worst_case_loss(bounded_module(model), x[picks], y[picks], eps=self.eps,
                                                   method=SYMBOLIC, clip_min=threat.clip_min,
                                                   clip_max=threat.clip_max)
            loss = loss + self.weight * robust
            self.symbolic_batches += 1
            self.symbolic_loss += robust.detach().double()
            self.verified += (worst_logits.detach().argmax(dim=1) == y[picks]).sum()
        return loss, logits

    def stats(self) -> Dict[str, float]:
        drawn = self.symbolic_batches * self.k
        return {"mixtrain_eps": self.eps, "mixtrain_iw": self.weight,
                "sym_batches": self.symbolic_batches / max(self.batches, 1),
                "sym_loss": float(self.symbolic_loss) / max(self.symbolic_batches, 1),
                "sym_acc": 100.0 * float(self.verified) / max(drawn, 1)}


class MixTrainLoop(TrainingLoop):
    """--trainer mixtrain: one step per batch on the MixTrain loss with Hydra's per-epoch eps and weight ramps."""

    validation_method = SYMBOLIC

    def __init__(self, cfg, threat: ThreatModel, device: torch.device):
        if threat.norm != LINF:
            raise UserError("--trainer mixtrain bounds Linf balls; use --distance l_inf")
        self.settings = ObjectiveSettings(threat=threat)
        self.eps, self.seed, self.k = threat.eps, cfg.seed, cfg.mixtrain_k
        self.interval_weight, self.starting_eps = cfg.interval_weight, cfg.starting_epsilon
        self.schedule_length, self.schedule_start = cfg.schedule_length, cfg.schedule_start

    def check_model(self, model) -> None:
        """A one-line UserError at set-up for a model the bounds cannot walk (trainers.certify.bounds.bound_steps)."""
        bound_steps(model)

    def schedule(self, epoch: int) -> Tuple[float, float]:
        return mixtrain_schedule(epoch, eps=self.eps, interval_weight=self.interval_weight,
                                 schedule_length=self.schedule_length, schedule_start=self.schedule_start,
                                 starting_eps=self.starting_eps)

    def train_epoch(self, model, attack_model, batches, optimizer, *, epoch: int, device: torch.device,
                    **common) -> Dict[str, float]:
        objective = _MixTrainObjective(self, epoch, device)
        stats = train_one_epoch(model, attack_model, batches, optimizer, objective, self.settings, epoch=epoch,
                                device=device, **common)
        stats.update(objective.stats())
        return stats
