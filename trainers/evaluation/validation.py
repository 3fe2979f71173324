"""Per-epoch validation: natural accuracy and, with an attack (`--attack_eval`), adversarial accuracy under the
configured threat model, as sums that several processes can add up (harp-spec §6.4)."""
from typing import Dict, Iterable, Optional

import torch.nn as nn

from trainers.evaluation.registry import EvalSettings, attack
from trainers.evaluation.scoring import score_batches
from trainers.threat import ThreatModel


def validation_attack(model: nn.Module, name: Optional[str], threat: ThreatModel):
    """The registered attack `name` run under `threat` as configured (None: natural accuracy only)."""
    if name is None:
        return None
    return attack(name).make(model, EvalSettings(threat=threat))


def validate(model: nn.Module, batches: Iterable, *, attack_name: Optional[str], threat: ThreatModel,
             num_batches: Optional[int] = None, desc: str = "validate", show_progress: bool = True) -> Dict[str, float]:
    """Sums (not means): n, natural_correct, natural_loss_sum and, with an attack, robust_correct and
    robust_loss_sum. The model is in eval mode throughout and every module's mode is restored afterwards."""
    result = score_batches(model, batches, attack=validation_attack(model, attack_name, threat), threat=threat,
                           num_batches=num_batches, desc=desc, show_progress=show_progress)
    return {k: float(v) for k, v in result.sums.items()}
