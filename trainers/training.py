"""Training loops by name (`--trainer`): what one epoch of a stage runs, and the loop's own state.

    base     natural training (the config resolver sets --adv_loss nat)
    adv      the --adv_loss objective (PGD-AT, TRADES, MART), after --warmup-epochs of --warmup-loss
    freeadv  Free-AT (Shafahi et al. 2019) with a perturbation that persists across batches and epochs
             (trainers/free_at.py)
    smooth, crown-ibp  Hydra's certified objectives (trainers/certified_training.py)
    mixtrain           Hydra's third one: clean CE + symbolic-interval robust CE on a few points (trainers/mixtrain.py)
    fast     Fast-AT (Wong et al. 2020): one FGSM step of 1.25 eps from a random start, with the catastrophic-
             overfitting guard (trainers/fast_at.py)

Every loop follows `trainers.protocols.TrainingLoop`: built once per run by `TRAINERS.get(name)(cfg, threat,
device)`, its `train_epoch(...)` returns the epoch's averages; it may bring per-epoch hooks into every mode
(`hooks`: registered names, Fast-AT's overfitting guard), refuse a model it cannot train at set-up
(`check_model(model)`, called by stage.set_up_training) and name its per-epoch validation (`validation_method`,
see trainers/evaluation/validation.py). A loop with state (Free-AT's perturbation) is also
`trainers.protocols.Stateful` and is saved and restored through the same generic checkpoint path as the
regularizers and hooks.
"""
from trainers.certified_training import CrownIBPLoop, SmoothingLoop
from trainers.engine import ObjectiveLoop
from trainers.fast_at import FastATLoop
from trainers.free_at import FreeATLoop
from trainers.mixtrain import MixTrainLoop
from utils.registry import Registry

TRAINERS = Registry("training loop")

TRAINERS.add("base", ObjectiveLoop)
TRAINERS.add("adv", ObjectiveLoop)
TRAINERS.add("freeadv", FreeATLoop)          # Free-AT (trainers/free_at.py)
TRAINERS.add("smooth", SmoothingLoop)        # randomized smoothing (trainers/certified_training.py)
TRAINERS.add("crown-ibp", CrownIBPLoop)      # verifiable training (trainers/certified_training.py)
TRAINERS.add("mixtrain", MixTrainLoop)       # verifiable training (trainers/mixtrain.py)
TRAINERS.add("fast", FastATLoop)             # Fast-AT (trainers/fast_at.py)
