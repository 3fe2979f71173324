"""Per-epoch validation: natural accuracy and a robust measure, as sums that several processes can add up
(the original's val_method adv). The measure is the run's --val-method (Hydra's names):

    base          natural accuracy only
    adv, freeadv  the training loop's robust measure: the attack --attack_eval under the configured threat model,
                  or the `validation_method` the loop names (--trainer smooth: smooth; crown-ibp: ibp; mixtrain: sym)
    smooth        accuracy of the smoothed classifier from 10 draws of noise std --noise-std (an estimate, not a
                  certificate; trainers.certify.smoothing.smoothed_validation)
    ibp, sym      IBP- / symbolic-verified accuracy at the threat model's Linf eps
                  (trainers.certify.bounds.verification_sums; Hydra's --val_method ibp / mixtrain)

train.py: `validate(model, batches, **validation_options(cfg), threat=..., ...)`.
"""
from typing import Any, Dict, Iterable, Optional

import torch.nn as nn

from configs.errors import UserError
from trainers.attacks.threat import LINF, ThreatModel
from trainers.certified_training import SMOOTH_VALIDATION
from trainers.certify.bounds import IBP, SYMBOLIC, verification_sums
from trainers.certify.smoothing import smoothed_validation
from trainers.evaluation.registry import EvalSettings, attack
from trainers.evaluation.scoring import score_batches
from trainers.training import TRAINERS
from utils.progress import progress

BASE, ATTACK = "base", "adv"


def _smoothed(model: nn.Module, batches: Iterable, *, threat: ThreatModel,
              noise_std: Optional[float]) -> Dict[str, float]:
    if noise_std is None:
        raise ValueError("smoothed validation needs noise_std")
    return smoothed_validation(model, batches, sigma=noise_std)


def _verified(method: str):
    def measure(model: nn.Module, batches: Iterable, *, threat: ThreatModel,
                noise_std: Optional[float]) -> Dict[str, float]:
        if threat.norm != LINF:
            raise UserError(f"--val-method {method} verifies Linf balls; use --distance l_inf")
        return verification_sums(model, batches, eps=threat.eps, method=method, clip_min=threat.clip_min,
                                 clip_max=threat.clip_max)
    return measure


# Validation measures that are not an attack: name -> fn(model, batches, threat=, noise_std=) -> sums.
MEASURES = {SMOOTH_VALIDATION: _smoothed, IBP: _verified(IBP), SYMBOLIC: _verified(SYMBOLIC)}


def validation_options(cfg) -> Dict[str, Any]:
    """validate()'s `method`, `attack_name` and `noise_std` for a run's config: --val-method, where adv/freeadv
    defer to the `validation_method` of the --trainer loop when it names one."""
    method = cfg.val_method
    if method != BASE and method not in MEASURES:
        method = getattr(TRAINERS.get(cfg.trainer), "validation_method", method)
    return {"method": method, "attack_name": cfg.attack_eval, "noise_std": cfg.noise_std}


def validation_attack(model: nn.Module, name: Optional[str], threat: ThreatModel):
    """The registered attack `name` run under `threat` as configured (None: natural accuracy only)."""
    if name is None:
        return None
    spec = attack(name)
    return spec.make(model, EvalSettings(threat=threat), spec.options())


def validate(model: nn.Module, batches: Iterable, *, attack_name: Optional[str], threat: ThreatModel,
             method: str = ATTACK, noise_std: Optional[float] = None, num_batches: Optional[int] = None,
             desc: str = "validate", show_progress: bool = True) -> Dict[str, float]:
    """Sums (not means): n, natural_correct, natural_loss_sum and, unless method is base (or an attack method
    without an attack), robust_correct and robust_loss_sum. The model is in eval mode throughout and every
    module's mode is restored afterwards."""
    if method in MEASURES:
        bar = progress(batches, total=num_batches, desc=desc, enabled=show_progress)
        return MEASURES[method](model, bar, threat=threat, noise_std=noise_std)
    if method == BASE:
        attack_name = None
    result = score_batches(model, batches, attack=validation_attack(model, attack_name, threat), threat=threat,
                           num_batches=num_batches, desc=desc, show_progress=show_progress)
    return {k: float(v) for k, v in result.sums.items()}
