"""Fast-AT (Wong et al., "Fast is better than free", ICLR 2020): adversarial training with one FGSM step from a
uniform random start in the eps-ball, step 1.25 * eps (their CIFAR-10 setting: eps 8/255, step 10/255), and the
catastrophic-overfitting guard that goes with it.

`--trainer fast` runs the Fast-AT loop in every mode (pretrain, prune, finetune, intrain). Its FGSM step is
`--fast-step`, by default 1.25 * --epsilon; `--step-size` stays the step of the PGD used by validation. As every
attack in this toolkit, the FGSM step runs with the model in eval mode (Wong et al. attack in train mode), and the
random start is clamped to the pixel range before the gradient is taken, as theirs.

Catastrophic overfitting (Wong et al. §5): FGSM training can suddenly lose all robustness to PGD while its
accuracy on its own FGSM examples keeps rising. The `overfit_guard` hook watches each validated epoch's record:
`robust_acc` (the PGD validation accuracy train.py measures anyway) and `train_acc` (the accuracy on the Fast-AT
examples the epoch trained on: FGSM accuracy at no extra cost). A collapse is a PGD accuracy at least
`--overfit-drop` points below its best so far together with an FGSM accuracy above the one at that best epoch.
`--overfit-guard warn` logs it; `stop` ends the run before the next epoch, so the collapsed epoch is saved and
model_best.pth.tar (chosen by PGD accuracy) holds the epoch before the collapse; `off` does nothing.
"""
import logging
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from configs.errors import UserError
from trainers.attacks.pgd import pgd
from trainers.attacks.threat import ThreatModel, random_start
from trainers.engine import ObjectiveLoop
from trainers.objectives import Objective, ObjectiveSettings
from trainers.regularizers import HOOKS

log = logging.getLogger(__name__)

STEP_OVER_EPS = 1.25  # Wong et al.: alpha = 1.25 * eps


def fast_threat(threat: ThreatModel, step: Optional[float] = None) -> ThreatModel:
    """The threat model of Fast-AT's attack: one step of `step` (default 1.25 * eps) from a random start."""
    return threat.with_(steps=1, step_size=STEP_OVER_EPS * threat.eps if step is None else step, random_start=True)


def fast_fgsm(model, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """FGSM from a uniform random start in the eps-ball (clamped to the pixel range), then projected."""
    start = random_start(x.detach(), threat).clamp(threat.clip_min, threat.clip_max)
    return pgd(model, x, y, threat, start=start)


def fast_at(model, attack_model, x, y, settings: ObjectiveSettings):
    """Cross-entropy on Fast-AT's examples (settings.threat: `fast_threat`); returns (loss, logits)."""
    x_adv = fast_fgsm(attack_model, x, y, settings.threat)
    logits = model(x_adv)
    return F.cross_entropy(logits, y), logits


class FastATLoop(ObjectiveLoop):
    """One optimizer step per batch on Fast-AT's loss (after --warmup-epochs of --warmup-loss under the configured
    threat model)."""

    hooks = ("overfit_guard",)  # per-epoch hooks this loop brings into every mode

    def __init__(self, cfg, threat: ThreatModel, device: torch.device):
        if cfg.adv_loss not in ("pgd", "nat"):
            raise UserError(f"--trainer fast uses its own FGSM objective; --adv_loss {cfg.adv_loss} does not apply")
        super().__init__(cfg, threat, device)
        self.settings = ObjectiveSettings(threat=fast_threat(threat, cfg.fast_step), beta=cfg.beta)

    def main_objective(self) -> Objective:
        return fast_at


class OverfitGuard:
    """Catastrophic-overfitting guard over the epoch records (see the module docstring)."""

    state_key = "overfit_guard"

    def __init__(self, action: str, drop: float):
        self.action, self.drop = action, drop
        self.best_robust: Optional[float] = None   # best PGD validation accuracy so far (%)
        self.fgsm_at_best: Optional[float] = None  # FGSM training accuracy of that epoch (%)
        self.collapsed_at: Optional[int] = None    # 1-based epoch of the first collapse

    def before_epoch(self, epoch: int) -> Dict[str, Any]:
        if self.action == "stop" and self.collapsed_at is not None:
            raise UserError(f"--overfit-guard stop: catastrophic overfitting in epoch {self.collapsed_at} (PGD "
                            "validation accuracy collapsed, FGSM training accuracy rose); model_best.pth.tar is before it")
        return {}

    def after_epoch(self, epoch: int, record: Dict[str, Any]) -> None:
        if self.action == "off" or "robust_acc" not in record or "train_acc" not in record:
            return
        robust, fgsm = record["robust_acc"], record["train_acc"]
        if self.best_robust is not None and robust <= self.best_robust - self.drop and fgsm > self.fgsm_at_best:
            if self.collapsed_at is None:
                self.collapsed_at = epoch + 1
            log.warning("catastrophic overfitting in epoch %d: PGD validation accuracy %.2f%% (best %.2f%%) while "
                        "FGSM training accuracy rose to %.2f%% (%.2f%% then)%s", epoch + 1, robust, self.best_robust,
                        fgsm, self.fgsm_at_best, "; stopping" if self.action == "stop" else
                        "; model_best.pth.tar keeps the best PGD epoch (--overfit-guard stop ends such runs)")
        if self.best_robust is None or robust > self.best_robust:
            self.best_robust, self.fgsm_at_best = robust, fgsm

    def state_dict(self) -> Dict:
        return {"best_robust": self.best_robust, "fgsm_at_best": self.fgsm_at_best, "collapsed_at": self.collapsed_at}

    def load_state_dict(self, state: Dict) -> None:
        self.best_robust, self.fgsm_at_best = state["best_robust"], state["fgsm_at_best"]
        self.collapsed_at = state["collapsed_at"]


HOOKS.add("overfit_guard", lambda cfg, regularizers: OverfitGuard(cfg.overfit_guard, cfg.overfit_drop))
