"""White-box attacks used for training, validation and test.py (harp-spec §6.1, §6.4, §7).

Every attack takes gradients with respect to the input only (`torch.autograd.grad`), never parameter
gradients (DESIGN.md §7), runs the model in eval mode and restores each module's mode afterwards,
and keeps x_adv inside the eps-ball around x and inside [clip_min, clip_max].
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LINF, L2 = "linf", "l2"


@dataclass(frozen=True)
class ThreatModel:
    eps: float
    step_size: float
    steps: int
    norm: str = LINF
    clip_min: float = 0.0
    clip_max: float = 1.0
    random_start: bool = True


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the attack (BN running statistics untouched), every module's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float = 50.0) -> torch.Tensor:
    """Summed -max(z_y - max_{j!=y} z_j + kappa, 0): ascending it pushes the true-class margin down."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return -torch.clamp(true - other + kappa, min=0).sum()


def project(x_adv: torch.Tensor, x: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    delta = x_adv - x
    if threat.norm == LINF:
        delta = delta.clamp(-threat.eps, threat.eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (threat.eps / norms).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(threat.clip_min, threat.clip_max)


def _ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    if threat.norm == LINF:
        return x_adv + threat.step_size * grad.sign()
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    return x_adv + threat.step_size * grad / norms


def random_start(x: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """Uniform in the Linf ball (as the original: no clamp before the first step) or uniform-radius in L2."""
    if threat.norm == LINF:
        return x + torch.empty_like(x).uniform_(-threat.eps, threat.eps)
    direction = torch.randn_like(x)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    radius = torch.rand(x.shape[0], device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return x + threat.eps * radius * direction


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
            x_adv = project(_ascent_step(x_adv.detach(), grad, threat), x, threat)
        return x_adv.clamp(threat.clip_min, threat.clip_max).detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, clip_min: float = 0.0,
         clip_max: float = 1.0) -> torch.Tensor:
    """One signed step of size eps from the clean input (test.py's FGSM)."""
    threat = ThreatModel(eps=eps, step_size=eps, steps=1, clip_min=clip_min, clip_max=clip_max, random_start=False)
    return pgd(model, x, y, threat)


def perturbation_norms(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example ||x_adv - x|| in the threat model's norm (float64 for an exact comparison with eps)."""
    delta = (x_adv.detach() - x.detach()).flatten(1).double()
    if norm == LINF:
        return delta.abs().amax(dim=1) if delta.shape[1] else delta.new_zeros(delta.shape[0])
    return delta.norm(dim=1)


def project_to_threat(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, clip_min: float = 0.0,
                      clip_max: float = 1.0) -> torch.Tensor:
    """x_adv pulled back into the eps-ball around x and into [clip_min, clip_max] (a no-op for valid points).

    test.py passes every attack's output through this before it scores it, so a third-party attack that
    overshoots the budget by rounding (or by a bug) can never count a point outside the threat model.
    """
    threat = ThreatModel(eps=eps, step_size=0.0, steps=0, norm=norm, clip_min=clip_min, clip_max=clip_max)
    return project(x_adv.detach(), x.detach(), threat).detach()


def trades_attack(model: nn.Module, x: torch.Tensor, threat: ThreatModel, clean_probs: torch.Tensor) -> torch.Tensor:
    """TRADES inner maximisation: sign steps on summed KL(p(x) || p(x')), start x + 0.001 N(0, I)."""
    with eval_mode(model):
        x = x.detach()
        x_adv = x + 0.001 * torch.randn_like(x)
        for _ in range(threat.steps):
            x_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), clean_probs, reduction="sum")
            (grad,) = torch.autograd.grad(kl, [x_adv])
            x_adv = project(_ascent_step(x_adv.detach(), grad, threat), x, threat)
        return x_adv.detach()
