"""The threat model: one object that every attack, objective and evaluation is built from.

`threat_from_config` is the only place a config's norm spelling (`l_inf`, `l_2`) is read; from there on the norm
is `LINF` or `L2`. Geometry helpers (projection, norms, random starts) live here with the object they serve.
"""
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

LINF, L2 = "linf", "l2"
_CONFIG_NORMS = {"l_inf": LINF, "l_2": L2}


@dataclass(frozen=True)
class ThreatModel:
    eps: float
    step_size: float
    steps: int
    norm: str = LINF
    clip_min: float = 0.0
    clip_max: float = 1.0
    random_start: bool = True

    def with_(self, **changes) -> "ThreatModel":
        return replace(self, **changes)


def threat_from_config(cfg, *, random_start: bool = True, step_size: Optional[float] = None) -> ThreatModel:
    """The configured threat model (--epsilon, --step-size, --num-steps, --distance, --clip-min/max)."""
    return ThreatModel(eps=cfg.epsilon, step_size=cfg.step_size if step_size is None else step_size,
                       steps=cfg.num_steps, norm=_CONFIG_NORMS[cfg.distance], clip_min=cfg.clip_min,
                       clip_max=cfg.clip_max, random_start=random_start)


Eps = Union[float, torch.Tensor]  # one budget, or one per example ([batch]; +inf: no constraint)


def per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [batch] tensor shaped to broadcast over `like`'s examples."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example ||delta|| in `norm`, in delta's dtype."""
    flat = delta.flatten(1)
    if norm == LINF:
        return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    return flat.norm(dim=1)


def dual_norms(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example dual norm of a gradient (L1 for Linf, L2 for L2): the rate of change along the norm's unit ball."""
    flat = grad.flatten(1)
    return flat.abs().sum(dim=1) if norm == LINF else flat.norm(dim=1)


def l2_normalised(values: torch.Tensor) -> torch.Tensor:
    """Each example scaled to L2 norm 1 (a zero example stays zero)."""
    return values / per_example(norms(values, L2).clamp_min(1e-12), values)


def project_delta(delta: torch.Tensor, eps: Eps, norm: str) -> torch.Tensor:
    """delta pulled into the eps-ball of `norm` (a no-op inside it)."""
    bound = per_example(eps, delta) if isinstance(eps, torch.Tensor) else eps
    if norm == LINF:
        return delta.clamp(-bound, bound)
    return delta * per_example((eps / norms(delta, norm).clamp_min(1e-12)).clamp(max=1.0), delta)


def project(x_adv: torch.Tensor, x: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """x_adv pulled into the eps-ball around x and into [clip_min, clip_max]."""
    return (x + project_delta(x_adv - x, threat.eps, threat.norm)).clamp(threat.clip_min, threat.clip_max)


def ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, step: float, norm: str) -> torch.Tensor:
    """One steepest-ascent step of length `step`: signed (Linf) or normalised (L2)."""
    if norm == LINF:
        return x_adv + step * grad.sign()
    return x_adv + step * grad / per_example(norms(grad, L2).clamp_min(1e-12), grad)


def random_start(x: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """Uniform in the Linf ball (as the original: no clamp before the first step) or uniform-radius in L2."""
    if threat.norm == LINF:
        return x + torch.empty_like(x).uniform_(-threat.eps, threat.eps)
    direction = l2_normalised(torch.randn_like(x))
    radius = per_example(torch.rand(x.shape[0], device=x.device, dtype=x.dtype), x)
    return x + threat.eps * radius * direction


def perturbation_norms(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example ||x_adv - x|| in the threat model's norm (float64 for an exact comparison with eps)."""
    return norms((x_adv.detach() - x.detach()).double(), norm)
