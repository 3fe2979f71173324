"""Fast Minimum-Norm attack (FMN) with HO-FMN's options, and security curves from minimal distances.

FMN (Pintor et al., "Fast Minimum-norm Adversarial Attacks through Adaptive Norm Constraints", NeurIPS 2021)
looks for the smallest perturbation that changes the prediction. It steps a perturbation delta along the
gradient of an attack loss while an eps-ball constraint adapts every step:

- adversarial now:        eps <- min(eps * (1 - gamma), best distance so far)      (shrink toward the boundary)
- not adversarial, one found before:  eps <- eps * (1 + gamma)                     (grow back)
- none found yet:         eps <- ||delta|| + |margin| / ||grad margin||_dual       (eps_start='boundary': FMN's
                          linearised boundary distance, logit-difference loss only) or eps unconstrained
                          (eps_start='unbounded', and every other loss: HO-FMN)

gamma is cosine-decayed from gamma_init to gamma_final, and eps never exceeds the largest perturbation the box
[clip_min, clip_max] allows. After every step delta is projected onto the eps-ball and x + delta clamped into
the box. The step size alpha follows a cosine schedule from
alpha_init to alpha_final (FMN) or a per-point reduce-on-plateau on the attack loss (HO-FMN's RLROP).
HO-FMN (Mura et al., "HO-FMN: Hyperparameter Optimization for Fast Minimum-Norm Attacks", 2024; the
evaluation of the Adversarial Pruning benchmark) adds the choice of loss
(logit difference 'ld', cross-entropy 'ce', DLR 'dlr') and of step rule; the rules here are

- 'plain': delta -= alpha * g / ||g||_2 for every norm (FMN's step);
- 'sgd':   heavy-ball momentum on the norm's steepest-descent direction (sign(g) for Linf as HO-FMN,
           g / ||g||_2 for L2); buf <- momentum * buf + d; delta -= alpha * buf;
- 'adam':  Adam on that same direction, with beta1 = momentum and beta2 = 0.999.

Every point keeps the smallest adversarial perturbation it found among the `steps + 1` iterates (one forward
pass more than gradient steps, so the last step is scored too). The attack is deterministic (no random start),
uses input gradients only (`torch.autograd.grad`), runs the model in eval mode and restores every module's mode.

Security curves (Piras et al. 2024): RA(eps) = share of points whose minimal distance exceeds eps.
Points misclassified on the clean input have distance 0 and are never robust. Points where FMN found nothing
have distance +inf (robust at every eps); the AP benchmark instead counts them as broken
(`failures_as_zero`, as HO-FMN's code).
"""
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.errors import UserError
from trainers.attacks.threat import (L2, LINF, dual_norms, l2_normalised, norms, per_example, perturbation_norms,
                                     project_delta)
from utils.modes import eval_mode

NORMS = (LINF, L2)
LOSSES = ("ld", "ce", "dlr")
OPTIMIZERS = ("plain", "sgd", "adam")
SCHEDULES = ("cosine", "plateau")
EPS_STARTS = ("boundary", "unbounded")

DEFAULT_STEPS = 100
ALPHA_FINAL_RATIO = 0.01        # alpha_final = alpha_init / 100 unless given (FMN's default)
ADAM_BETA2, ADAM_EPS = 0.999, 1e-8
PLATEAU_PATIENCE = 5            # steps without a relative loss improvement of PLATEAU_THRESHOLD before alpha drops
PLATEAU_FACTOR = 0.5            # alpha multiplier at a plateau (never below alpha_final)
PLATEAU_THRESHOLD = 1e-3
DLR_EPS = 1e-12                 # keeps DLR's denominator positive when the top logits tie


@dataclass(frozen=True)
class FMNConfig:
    """FMN's hyper-parameters beyond norm and steps (what HO-FMN tunes); `asdict` gives `fmn`'s keywords.

    The defaults are FMN's (plain step, cosine alpha 1 -> 0.01, gamma 0.05 -> 0.001) with the cross-entropy loss.
    With FMN's logit-difference loss and boundary start, L2 FMN stalls on inputs whose pixels sit at the box
    edges (digits): the linearised distance counts gradient components the box blocks, falls short, and eps
    approaches the boundary from the inside without crossing it (adv-lib's FMN does the same; the tests show
    it). On the digits small_cnn (PGD-AT) CE never fails and is within 0.3 points of the best configuration
    tried in both Linf and L2.
    """
    loss: str = "ce"
    optimizer: str = "plain"
    schedule: str = "cosine"
    alpha_init: float = 1.0         # plain: L2 length of a step; sgd/adam in Linf: per-pixel step (sign)
    alpha_final: Optional[float] = None
    momentum: float = 0.9           # sgd momentum / adam beta1; unused by 'plain'
    gamma_init: float = 0.05
    gamma_final: float = 0.001
    eps_start: str = "boundary"     # before the first adversarial point: FMN's linearised boundary distance
                                    # (ld loss only; other losses start unbounded) or 'unbounded' (HO-FMN)

    def validated(self) -> "FMNConfig":
        for name, value, choices in (("loss", self.loss, LOSSES), ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("schedule", self.schedule, SCHEDULES),
                                     ("eps_start", self.eps_start, EPS_STARTS)):
            if value not in choices:
                raise UserError(f"FMN {name} {value!r} is not one of {', '.join(choices)}")
        if not self.alpha_init > 0 or (self.alpha_final is not None and not 0 <= self.alpha_final <= self.alpha_init):
            raise UserError(f"FMN needs alpha_init > 0 and 0 <= alpha_final <= alpha_init, got {self.alpha_init}, "
                            f"{self.alpha_final}")
        if not 0 <= self.momentum < 1 or not 0 <= self.gamma_final <= self.gamma_init < 1:
            raise UserError(f"FMN needs 0 <= momentum < 1 and 0 <= gamma_final <= gamma_init < 1, got momentum "
                            f"{self.momentum}, gamma {self.gamma_init} -> {self.gamma_final}")
        return self

    @property
    def final_alpha(self) -> float:
        return self.alpha_init * ALPHA_FINAL_RATIO if self.alpha_final is None else self.alpha_final


@dataclass
class FMNResult:
    """Per point: minimal distance (float64, CPU; 0 if the clean input already succeeds, +inf if nothing was
    found), whether the clean input is classified correctly, and the best adversarial input (the clean input
    where nothing was found). `params` are the settings the attack ran with."""
    distances: torch.Tensor
    clean_correct: torch.Tensor
    x_adv: Optional[torch.Tensor]
    params: Dict[str, Any] = field(default_factory=dict)

    @property
    def found(self) -> torch.Tensor:
        return torch.isfinite(self.distances)


# ----------------------------------------------------------------------------------------------- losses
def _margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_label - max_{j != label} z_j per point."""
    own = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return own - other


def attack_objective(logits: torch.Tensor, labels: torch.Tensor, loss: str, targeted: bool) -> torch.Tensor:
    """Per-point quantity FMN minimises; `labels` are the true classes (untargeted) or the targets.

    ld:  untargeted z_y - max_{j!=y} z_j; targeted max_{j!=t} z_j - z_t (negative exactly when adversarial).
    ce:  untargeted -CE(z, y); targeted CE(z, t).
    dlr: the ld quantity over z_pi1 - z_pi3 (untargeted) or z_pi1 - (z_pi3 + z_pi4) / 2 (targeted), with pi the
         logits sorted descending (Croce & Hein, ICML 2020).
    """
    if loss == "ce":
        ce = F.cross_entropy(logits, labels, reduction="none")
        return ce if targeted else -ce
    margin = _margin(logits, labels)
    difference = -margin if targeted else margin
    if loss == "ld":
        return difference
    top = logits.sort(dim=1, descending=True).values
    scale = top[:, 0] - (0.5 * (top[:, 2] + top[:, 3]) if targeted else top[:, 2])
    return difference / (scale + DLR_EPS)


# ----------------------------------------------------------------------------------------------- steps
class _StepRule:
    """One of FMN's step rules with a per-point step size alpha (a [batch] tensor)."""

    def __init__(self, config: FMNConfig, norm: str, delta: torch.Tensor):
        self.config, self.norm = config, norm
        self.buffer = torch.zeros_like(delta)
        self.second = torch.zeros_like(delta) if config.optimizer == "adam" else None
        self.t = 0

    def update(self, grad: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The amount to subtract from delta for the gradient `grad` of the minimised objective."""
        c = self.config
        if c.optimizer == "plain":
            return per_example(alpha, grad) * l2_normalised(grad)
        direction = grad.sign() if self.norm == LINF else l2_normalised(grad)
        if c.optimizer == "sgd":
            self.buffer = c.momentum * self.buffer + direction
            return per_example(alpha, grad) * self.buffer
        self.t += 1
        self.buffer = c.momentum * self.buffer + (1 - c.momentum) * direction
        self.second = ADAM_BETA2 * self.second + (1 - ADAM_BETA2) * direction * direction
        first = self.buffer / (1 - c.momentum ** self.t)
        second = self.second / (1 - ADAM_BETA2 ** self.t)
        return per_example(alpha, grad) * first / (second.sqrt() + ADAM_EPS)


def _cosine(start: float, end: float, step: int, steps: int) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * step / steps)) / 2


class _Plateau:
    """Per-point reduce-on-plateau of alpha on the attack objective (HO-FMN's vectorised RLROP)."""

    def __init__(self, alpha: torch.Tensor, floor: float):
        self.alpha, self.floor = alpha, floor
        self.best = torch.full_like(alpha, float("inf"))
        self.stale = torch.zeros_like(alpha, dtype=torch.long)

    def step(self, objective: torch.Tensor) -> torch.Tensor:
        improved = objective < self.best - PLATEAU_THRESHOLD * self.best.abs().nan_to_num(posinf=0.0)
        self.best = torch.where(improved, objective, self.best)
        self.stale = torch.where(improved, torch.zeros_like(self.stale), self.stale + 1)
        drop = self.stale > PLATEAU_PATIENCE
        self.alpha = torch.where(drop, (self.alpha * PLATEAU_FACTOR).clamp_min(self.floor), self.alpha)
        self.stale = torch.where(drop, torch.zeros_like(self.stale), self.stale)
        return self.alpha


# ----------------------------------------------------------------------------------------------- attack
def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    parameter = next(model.parameters(), None)
    return fallback if parameter is None else parameter.device


def _check_inputs(x: torch.Tensor, y: torch.Tensor, norm: str, steps: int, targeted: bool,
                  targets: Optional[torch.Tensor], clip_min: float, clip_max: float) -> None:
    if norm not in NORMS:
        raise UserError(f"FMN norm {norm!r} is not one of {', '.join(NORMS)}")
    if steps < 1:
        raise UserError(f"FMN needs at least one step, got {steps}")
    if targeted and (targets is None or targets.shape != y.shape):
        raise UserError("targeted FMN needs one target class per point (targets=..., shaped like y)")
    if x.numel() and (float(x.min()) < clip_min or float(x.max()) > clip_max):
        raise UserError(f"FMN inputs must lie in [{clip_min}, {clip_max}]")


def _check_classes(num_classes: int, loss: str, targeted: bool) -> None:
    needed = 4 if targeted else 3
    if loss == "dlr" and num_classes < needed:
        raise UserError(f"the DLR loss needs at least {needed} classes, the model has {num_classes}")


def fmn_config(**hyper: Any) -> FMNConfig:
    """An FMNConfig from keywords (the ones `fmn` takes and `tune_fmn` returns), validated."""
    unknown = sorted(set(hyper) - {f.name for f in fields(FMNConfig)})
    if unknown:
        raise UserError(f"unknown FMN setting(s) {', '.join(unknown)}; known: "
                        f"{', '.join(f.name for f in fields(FMNConfig))}")
    return FMNConfig(**hyper).validated()


def fmn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str = LINF, steps: int = DEFAULT_STEPS,
        targeted: bool = False, targets: Optional[torch.Tensor] = None, clip_min: float = 0.0, clip_max: float = 1.0,
        **hyper: Any) -> FMNResult:
    """FMN on one batch, on the model's device (module docstring).

    `hyper` are FMNConfig's fields: loss ('ld'|'ce'|'dlr'), optimizer ('plain'|'sgd'|'adam'), schedule
    ('cosine'|'plateau'), alpha_init, alpha_final (default alpha_init / 100), momentum, gamma_init, gamma_final,
    eps_start ('boundary'|'unbounded'). `y` are the true labels; with `targeted`, success means reaching `targets`
    and the distance is the distance to the target class (0 where the clean input is already classified as
    the target).
    """
    config = fmn_config(**hyper)
    _check_inputs(x, y, norm, steps, targeted, targets, clip_min, clip_max)
    params = dict(norm=norm, steps=steps, targeted=targeted, clip_min=clip_min, clip_max=clip_max, **asdict(config),
                  final_alpha=config.final_alpha)
    origin = x.device
    device = _model_device(model, origin)
    x, y = x.detach().to(device), y.to(device)
    goal = targets.to(device) if targeted else y
    with eval_mode(model):
        best_adv, found, clean_correct = _attack(model, x, y, goal, norm, steps, targeted, config, clip_min, clip_max)
    distances = perturbation_norms(best_adv, x, norm).cpu()
    distances[~found.cpu()] = float("inf")
    return FMNResult(distances=distances, clean_correct=clean_correct.cpu(), x_adv=best_adv.to(origin), params=params)


def _next_eps(eps: torch.Tensor, is_adv: torch.Tensor, found: torch.Tensor, best_norm: torch.Tensor,
              boundary: torch.Tensor, gamma: float, worst: torch.Tensor) -> torch.Tensor:
    """FMN's eps update (module docstring): shrink when adversarial, grow when not, jump to `boundary` (the
    linearised distance, or +inf) while nothing has been found; never beyond the box's `worst` perturbation."""
    grown = torch.where(found, eps * (1 + gamma), boundary)
    return torch.minimum(torch.where(is_adv, torch.minimum(eps * (1 - gamma), best_norm), grown), worst)


def _attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, goal: torch.Tensor, norm: str, steps: int,
            targeted: bool, config: FMNConfig, clip_min: float, clip_max: float
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    delta = torch.zeros_like(x)
    eps = torch.full((n,), float("inf"), device=x.device)
    # Largest perturbation the box allows: eps never needs to exceed it.
    worst = norms(torch.maximum(x - clip_min, clip_max - x), norm)
    best_norm = torch.full((n,), float("inf"), device=x.device)
    best_adv = x.clone()
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    clean_correct = torch.zeros(n, dtype=torch.bool, device=x.device)
    rule = _StepRule(config, norm, delta)
    alpha = torch.full((n,), config.alpha_init, device=x.device)
    plateau = _Plateau(alpha, config.final_alpha) if config.schedule == "plateau" else None

    # steps gradient steps; the extra pass scores the last iterate.
    for k in range(steps + 1):
        delta.requires_grad_(k < steps)
        with torch.set_grad_enabled(k < steps):
            logits = model(x + delta)
        prediction = logits.argmax(dim=1)
        if k == 0:
            clean_correct = prediction == y
            _check_classes(logits.shape[1], config.loss, targeted)
        is_adv = prediction == goal if targeted else prediction != goal
        delta_norm = norms(delta.detach(), norm)
        better = is_adv & (delta_norm < best_norm)
        best_norm = torch.where(better, delta_norm, best_norm)
        best_adv = torch.where(per_example(better, x), (x + delta).detach(), best_adv)
        found |= is_adv
        if k == steps:
            break

        objective = attack_objective(logits, goal, config.loss, targeted)
        (grad,) = torch.autograd.grad(objective.sum(), [delta])
        objective, delta = objective.detach(), delta.detach()

        if config.eps_start == "boundary" and config.loss == "ld":
            boundary = delta_norm + objective.abs() / dual_norms(grad, norm).clamp_min(1e-12)
        else:
            boundary = torch.full_like(eps, float("inf"))
        gamma = _cosine(config.gamma_init, config.gamma_final, k, steps)
        eps = _next_eps(eps, is_adv, found, best_norm, boundary, gamma, worst)

        if plateau is not None:
            alpha = plateau.step(objective)
        else:
            alpha = torch.full_like(alpha, _cosine(config.alpha_init, config.final_alpha, k, steps))
        delta = project_delta(delta - rule.update(grad, alpha), eps, norm)
        delta = (x + delta).clamp(clip_min, clip_max) - x
    return best_adv, found, clean_correct


def fmn_batches(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *, keep_adv: bool = False,
                **kwargs: Any) -> FMNResult:
    """`fmn` over (x, y) batches, results concatenated (x_adv only with `keep_adv`, to save memory)."""
    results = []
    for x, y in batches:
        result = fmn(model, x, y, **kwargs)
        if not keep_adv:
            result.x_adv = None
        results.append(result)
    if not results:
        raise UserError("FMN got no points to attack")
    return FMNResult(distances=torch.cat([r.distances for r in results]),
                     clean_correct=torch.cat([r.clean_correct for r in results]),
                     x_adv=torch.cat([r.x_adv for r in results]) if keep_adv else None, params=results[0].params)


# ----------------------------------------------------------------------------------------------- curves
def _as_distances(distances: Any) -> torch.Tensor:
    d = torch.as_tensor(distances, dtype=torch.float64).flatten().cpu()
    if d.numel() == 0:
        raise UserError("a security curve needs at least one distance")
    if torch.isnan(d).any() or (d < 0).any():
        raise UserError("distances must be non-negative numbers (+inf for points never broken)")
    return d


def robust_accuracy_at(distances: Any, eps: float) -> float:
    """Robust accuracy in percent at budget eps: the share of points with minimal distance > eps."""
    if not eps >= 0:
        raise UserError(f"eps must be a non-negative number, got {eps}")
    return security_curve(distances, [eps])[0]["robust_acc"]


def security_curve(distances: Any, eps_grid: Sequence[float]) -> List[Dict[str, float]]:
    """[{'eps', 'robust_acc'}] in ascending eps; robust_acc (percent) never increases along the curve."""
    d = _as_distances(distances)
    grid = sorted(float(e) for e in eps_grid)
    if not grid or not all(math.isfinite(e) and e >= 0 for e in grid):
        raise UserError("the eps grid must be a non-empty list of finite non-negative numbers")
    return [{"eps": e, "robust_acc": 100.0 * float((d > e).double().mean())} for e in grid]


def failures_as_zero(distances: Any) -> torch.Tensor:
    """The AP benchmark's counting: a point FMN never broke gets distance 0 (counted as not robust), because
    HO-FMN starts best_adv at the clean input (HO-FMN's code). A pessimistic estimate."""
    d = _as_distances(distances).clone()
    d[torch.isinf(d)] = 0.0
    return d
