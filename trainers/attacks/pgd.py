"""Gradient attacks: PGD (cross-entropy or CW margin), FGSM, and TRADES' inner maximisation (the original HARP code's trainer/adv.py, utils/eval.py and test.py).

Used by the training objectives and, registered by name, by validation and test.py (trainers/evaluation/).
Every attack takes gradients with respect to the input only (`torch.autograd.grad`), never parameter
gradients (README "What makes it fast"), runs the model in eval mode and restores each module's mode afterwards, and keeps
x_adv inside the eps-ball around x and inside [clip_min, clip_max].
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.attacks.threat import ThreatModel, ascent_step, project, random_start
from utils.modes import eval_mode

CW_KAPPA = 50.0  # the original's CW confidence


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float = CW_KAPPA) -> torch.Tensor:
    """Summed -max(z_y - max_{j!=y} z_j + kappa, 0): ascending it pushes the true-class margin down."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return -torch.clamp(true - other + kappa, min=0).sum()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, loss: str = "ce",
        start: torch.Tensor = None) -> torch.Tensor:
    """Projected gradient ascent on summed cross-entropy (`ce`) or the CW margin loss (`cw`)."""
    with eval_mode(model):
        x = x.detach()
        if start is not None:
            x_adv = start.detach()
        elif threat.random_start:
            x_adv = random_start(x, threat)
        else:
            x_adv = x.clone()
        for _ in range(threat.steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            objective = F.cross_entropy(logits, y, reduction="sum") if loss == "ce" else cw_margin_loss(logits, y)
            (grad,) = torch.autograd.grad(objective, [x_adv])
            x_adv = project(ascent_step(x_adv.detach(), grad, threat.step_size, threat.norm), x, threat)
        return x_adv.clamp(threat.clip_min, threat.clip_max).detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
         step: Optional[float] = None) -> torch.Tensor:
    """One steepest-ascent step of size `step` (default: the whole budget eps) from the clean input, no random
    start. test.py's and validation's FGSM take eps; the original's warm-up objective takes the PGD step size."""
    return pgd(model, x, y, threat.with_(steps=1, step_size=threat.eps if step is None else step, random_start=False))


def trades_attack(model: nn.Module, x: torch.Tensor, threat: ThreatModel, clean_probs: torch.Tensor) -> torch.Tensor:
    """TRADES inner maximisation: sign steps on summed KL(p(x) || p(x')), start x + 0.001 N(0, I)."""
    with eval_mode(model):
        x = x.detach()
        x_adv = x + 0.001 * torch.randn_like(x)
        for _ in range(threat.steps):
            x_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), clean_probs, reduction="sum")
            (grad,) = torch.autograd.grad(kl, [x_adv])
            x_adv = project(ascent_step(x_adv.detach(), grad, threat.step_size, threat.norm), x, threat)
        return x_adv.detach()
