"""Training loops by name (`--trainer`): what one epoch of a stage runs, and the loop's own state.

    base     natural training (the config resolver sets --adv_loss nat)
    adv      the --adv_loss objective (PGD-AT, TRADES, MART), after --warmup-epochs of --warmup-loss
    freeadv  Free-AT (Shafahi et al. 2019) with a perturbation that persists across batches and epochs
    smooth, crown-ibp  Hydra's certified objectives (trainers/certified_training.py)
    mixtrain           Hydra's third one: clean CE + symbolic-interval robust CE on a few points (trainers/mixtrain.py)
    fast     Fast-AT (Wong et al. 2020): one FGSM step of 1.25 eps from a random start, with the catastrophic-
             overfitting guard (trainers/fast_at.py)

A loop is built once per run by `TRAINERS.get(name)(cfg, threat, device)`; its `train_epoch(...)` returns the
epoch's averages. A loop with state (Free-AT's perturbation) has `state_dict`/`load_state_dict` and is saved and
restored through the same generic checkpoint path as the regularizers and hooks. A loop may bring per-epoch hooks
into every mode (`hooks`: registered names, Fast-AT's overfitting guard). A loop may also name its per-epoch
validation (`validation_method`, see trainers/evaluation/validation.py) and refuse a model it cannot train at
set-up (`check_model(model)`, called by stage.set_up_training).
"""
from typing import Dict

import torch

from trainers.attacks.threat import ThreatModel
from trainers.certified_training import CrownIBPLoop, SmoothingLoop
from trainers.engine import FreePerturbation, ObjectiveLoop, train_one_epoch_free
from trainers.fast_at import FastATLoop
from trainers.mixtrain import MixTrainLoop
from utils.registry import Registry

TRAINERS = Registry("training loop")


class FreeATLoop:
    """Free-AT: every batch replayed --n-repeats times, each replay one step of weights and perturbation."""

    state_key = "free_perturbation"

    def __init__(self, cfg, threat: ThreatModel, device: torch.device):
        self.perturbation = FreePerturbation(threat.eps, threat.clip_min, threat.clip_max)
        self.n_repeats = cfg.n_repeats
        self.device = device

    def train_epoch(self, model, attack_model, batches, optimizer, *, epoch: int, **common) -> Dict[str, float]:
        return train_one_epoch_free(model, batches, optimizer, self.perturbation, n_repeats=self.n_repeats,
                                    epoch=epoch, **common)

    def state_dict(self) -> Dict:
        return self.perturbation.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.perturbation.load_state_dict(state, self.device)


TRAINERS.add("base", ObjectiveLoop)
TRAINERS.add("adv", ObjectiveLoop)
TRAINERS.add("freeadv", FreeATLoop)
TRAINERS.add("smooth", SmoothingLoop)        # randomized smoothing (trainers/certified_training.py)
TRAINERS.add("crown-ibp", CrownIBPLoop)      # verifiable training (trainers/certified_training.py)
TRAINERS.add("mixtrain", MixTrainLoop)       # verifiable training (trainers/mixtrain.py)
TRAINERS.add("fast", FastATLoop)             # Fast-AT (trainers/fast_at.py)
