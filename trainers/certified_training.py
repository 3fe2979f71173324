"""Training loops of Hydra's certified objectives (`--trainer smooth`, `--trainer crown-ibp`; Hydra's
trainer/smooth.py and trainer/crown_ibp.py; the third, MixTrain, is trainers/mixtrain.py). Both step through the
shared epoch of trainers/engine.py, so the recipe's regularizers (HARP's hardware loss), bf16, progress and the
finite-loss check apply unchanged, in every exp-mode.

    smooth     randomized smoothing (Cohen et al. 2019) with noise std --noise-std on [0, 1] inputs:
               --smooth-loss kl: Hydra's CE(f(x)) + --beta * KL(p(x) || p(x + delta)) (its non-ImageNet trainer);
               --smooth-loss gaussian: CE on x + delta (Cohen et al.; Hydra's ImageNet trainer, the imagenet preset)
    crown-ibp  Zhang et al. (ICLR 2020) as Hydra trains it: CE on minus the lower bound of the margins over the
               Linf --epsilon ball, the bound a mix beta * CROWN-IBP + (1 - beta) * IBP; eps ramps per step from
               --starting-epsilon to --epsilon over --schedule-length epochs from --schedule-start, and beta falls
               from 1 to 0 with it (trainers/certify/bounds.py). Needs an nn.Sequential of Conv2d/Linear/ReLU/Flatten
               (cifar_model, cifar_model_large); any other model is refused when the run is set up.

Each loop names its per-epoch validation (`validation_method`, read by trainers.evaluation.validation): the
smoothed classifier's accuracy for smooth, IBP-verified accuracy for crown-ibp (Hydra's `--val_method smooth|ibp`).
Neither loop has state of its own: the noise comes from the per-epoch seeded RNG and the eps ramp is a function of
(epoch, step), so a resumed run continues exactly.
"""
from typing import Dict, Tuple

import torch
import torch.nn as nn

from configs.errors import UserError
from trainers.attacks.threat import LINF, ThreatModel
from trainers.certify.bounds import IBP, bound_steps, crown_ibp_loss, crown_ibp_schedule
from trainers.certify.smoothing import gaussian_augmentation_loss, smooth_loss
from trainers.engine import ObjectiveLoop, train_one_epoch
from trainers.objectives import Objective, ObjectiveSettings
from trainers.protocols import TrainingLoop

# The loops' per-epoch validation: --val-method names (trainers/evaluation/validation.py).
SMOOTH_VALIDATION, IBP_VALIDATION = "smooth", IBP


# ----------------------------------------------------------------------------------------------- smoothing
def smoothing_kl(model, attack_model, x, y, settings: ObjectiveSettings) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hydra's smooth objective (trainers.certify.smoothing.smooth_loss); returns the clean logits."""
    return smooth_loss(model, x, y, sigma=settings.noise_std, beta=settings.beta)


def gaussian_augmentation(model, attack_model, x, y, settings: ObjectiveSettings) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cohen et al.'s noise augmentation (trainers.certify.smoothing.gaussian_augmentation_loss); returns the noisy
    logits."""
    return gaussian_augmentation_loss(model, x, y, sigma=settings.noise_std)


SMOOTHING_OBJECTIVES = {"kl": smoothing_kl, "gaussian": gaussian_augmentation}


class SmoothingLoop(ObjectiveLoop):
    """--trainer smooth: one step per batch on the --smooth-loss objective, after --warmup-epochs of --warmup-loss."""

    validation_method = SMOOTH_VALIDATION
    model_options = ("noise_std",)  # the smoothed classifier is the network under noise of this std

    def __init__(self, cfg, threat: ThreatModel, device: torch.device):
        super().__init__(cfg, threat, device)
        self.settings = self.warmup_settings = ObjectiveSettings(threat=threat, beta=cfg.beta,
                                                                 noise_std=cfg.noise_std)
        self.smooth_loss = cfg.smooth_loss

    def main_objective(self) -> Objective:
        return SMOOTHING_OBJECTIVES[self.smooth_loss]


# ----------------------------------------------------------------------------------------------- CROWN-IBP
def bounded_module(model: nn.Module) -> nn.Module:
    """The Sequential the bounds walk: a torch.compile wrapper is looked through (its forward is not what the
    bounds compute); DistributedDataParallel is refused, because bounds computed on the inner module would
    bypass its gradient synchronisation."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise UserError("the bound-trained loops (--trainer crown-ibp, mixtrain) run in a single process; start "
                        "them without torchrun")
    return getattr(model, "_orig_mod", model)


class _RampedCrownIBP:
    """The objective of one epoch: CROWN-IBP loss at the (eps, beta) of the current optimizer step."""

    def __init__(self, loop: "CrownIBPLoop", epoch: int, steps_per_epoch: int):
        self.loop, self.epoch, self.steps_per_epoch = loop, epoch, steps_per_epoch
        self.step = 0
        self.eps, self.beta = loop.ramp(epoch, 0, steps_per_epoch)

    def __call__(self, model, attack_model, x, y, settings: ObjectiveSettings) -> Tuple[torch.Tensor, torch.Tensor]:
        self.eps, self.beta = self.loop.ramp(self.epoch, self.step, self.steps_per_epoch)
        self.step += 1
        threat = settings.threat
        return crown_ibp_loss(bounded_module(model), x, y, eps=self.eps, beta=self.beta, clip_min=threat.clip_min,
                              clip_max=threat.clip_max)


class CrownIBPLoop(TrainingLoop):
    """--trainer crown-ibp: one step per batch on the CROWN-IBP loss with Hydra's linear eps ramp.

    Its training accuracy is the verified accuracy of the training batches at the step's eps (the argmax of
    the worst-case logits is the label exactly when the point is verified); `crown_eps` and `crown_beta` in the
    epoch's record are the values of its last step.
    """

    validation_method = IBP_VALIDATION

    def __init__(self, cfg, threat: ThreatModel, device: torch.device):
        self.settings = ObjectiveSettings(threat=threat)
        self.eps = threat.eps
        self.schedule_length, self.schedule_start = cfg.schedule_length, cfg.schedule_start
        self.starting_eps = cfg.starting_epsilon
        if threat.norm != LINF:
            raise UserError("--trainer crown-ibp bounds Linf balls; use --distance l_inf")

    def check_model(self, model: nn.Module) -> None:
        """A one-line UserError at set-up for a model the bounds cannot walk (trainers.certify.bounds.bound_steps)."""
        bound_steps(model)

    def ramp(self, epoch: int, step: int, steps_per_epoch: int) -> Tuple[float, float]:
        return crown_ibp_schedule(epoch, step, steps_per_epoch=steps_per_epoch, eps=self.eps,
                                  schedule_length=self.schedule_length, schedule_start=self.schedule_start,
                                  starting_eps=self.starting_eps)

    def train_epoch(self, model, attack_model, batches, optimizer, *, epoch: int, num_batches: int,
                    **common) -> Dict[str, float]:
        objective = _RampedCrownIBP(self, epoch, num_batches)
        stats = train_one_epoch(model, attack_model, batches, optimizer, objective, self.settings, epoch=epoch,
                                num_batches=num_batches, **common)
        stats.update(crown_eps=objective.eps, crown_beta=objective.beta)
        return stats
