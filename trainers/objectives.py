"""Adversarial-training objectives (the original HARP code's utils/adv.py): each returns (mean loss, logits on the trained inputs).

The attack runs on `attack_model` in eval mode; the loss forwards run on `model` in train mode. They are
the same module except under DistributedDataParallel, where attacks use the unwrapped module (the
attack's input-gradient backward must not trigger DDP's gradient synchronisation).
The original's extra clean forward per batch (for logging only) is gone: the logits returned here serve
for the training accuracy.
"""
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from trainers.attacks.pgd import fgsm, pgd, trades_attack
from trainers.attacks.threat import ThreatModel
from utils.modes import eval_mode
from utils.registry import Registry

Objective = Callable[..., Tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ObjectiveSettings:
    threat: ThreatModel   # the training attack
    beta: float = 6.0     # TRADES / MART robust-loss weight (and Hydra's smoothing KL weight)
    noise_std: float = 0.25  # randomized smoothing's sigma, in [0, 1] input units (trainers/certified_training.py)


def natural(model, attack_model, x, y, settings) -> Tuple[torch.Tensor, torch.Tensor]:
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def pgd_at(model, attack_model, x, y, settings) -> Tuple[torch.Tensor, torch.Tensor]:
    """Madry et al. PGD-AT: CE on PGD examples only (uniform random start, summed-CE ascent)."""
    x_adv = pgd(attack_model, x, y, settings.threat)
    logits = model(x_adv)
    return F.cross_entropy(logits, y), logits


def fgsm_at(model, attack_model, x, y, settings) -> Tuple[torch.Tensor, torch.Tensor]:
    """Warm-up objective of the original: one step of size step_size (not eps), no random start."""
    x_adv = fgsm(attack_model, x, y, settings.threat, step=settings.threat.step_size)
    logits = model(x_adv)
    return F.cross_entropy(logits, y), logits


def trades(model, attack_model, x, y, settings) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zhang et al. 2019: CE(f(x)) + beta * KL(p(x) || p(x')) / B."""
    with torch.no_grad(), eval_mode(attack_model):
        clean_probs = F.softmax(attack_model(x), dim=1)
    x_adv = trades_attack(attack_model, x, settings.threat, clean_probs)
    logits_clean = model(x)
    logits_adv = model(x_adv)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="sum")
    return F.cross_entropy(logits_clean, y) + settings.beta * robust / x.shape[0], logits_adv


def mart(model, attack_model, x, y, settings) -> Tuple[torch.Tensor, torch.Tensor]:
    """Wang et al. 2020 (MART): boosted CE on x' plus beta * KL weighted by 1 - p_y(x)."""
    x_adv = pgd(attack_model, x, y, settings.threat.with_(random_start=False),
                start=(x + 0.001 * torch.randn_like(x)), loss="ce")
    logits_adv = model(x_adv)
    logits_clean = model(x)
    probs_adv = F.softmax(logits_adv, dim=1)
    top2 = probs_adv.argsort(dim=1)[:, -2:]
    wrong_best = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - probs_adv + 1e-12), wrong_best)
    probs_clean = F.softmax(logits_clean, dim=1)
    true_prob = probs_clean.gather(1, y[:, None]).squeeze(1)
    kl = (probs_clean * (torch.log(probs_clean + 1e-12) - torch.log(probs_adv + 1e-12))).sum(dim=1)
    robust = (kl * (1.0000001 - true_prob)).sum() / x.shape[0]
    return boosted + settings.beta * robust, logits_adv


# --adv_loss chooses from these (a new objective: its function and one `add`); --warmup-loss also has fgsm.
OBJECTIVES = Registry("adversarial objective")
for _name, _objective in (("pgd", pgd_at), ("trades", trades), ("mart", mart), ("nat", natural)):
    OBJECTIVES.add(_name, _objective)
_WARMUP_ONLY = {"fgsm": fgsm_at}


def get_objective(name: str) -> Objective:
    return _WARMUP_ONLY[name] if name in _WARMUP_ONLY else OBJECTIVES.get(name)
