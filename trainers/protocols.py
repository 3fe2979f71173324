"""The contracts of what a training stage steps besides the model (stage.TrainingParts): a training loop, a per-epoch
hook, and a part whose state is checkpointed. A loss term's contract, `Regularizer`, sits with the regularizers
(trainers/regularizers.py).

They are `typing.Protocol`s: a part needs only the members, no base class. A loop may still subclass
`TrainingLoop` to inherit its defaults (no hooks of its own, any model accepted).
"""
from typing import Any, Dict, Iterable, Protocol, Sequence, Tuple, runtime_checkable

import torch
import torch.nn as nn


class TrainingLoop(Protocol):
    """What one epoch of a stage runs (`--trainer NAME`), built once per run as `TRAINERS.get(name)(cfg, threat,
    device)`. A loop may also name its per-epoch validation with a class attribute `validation_method` (read by
    trainers/evaluation/validation.py)."""

    hooks: Tuple[str, ...] = ()  # registered per-epoch hooks the loop brings into every mode (Fast-AT's guard)
    # Config fields that are part of the model the loop trains (the smoothed classifier's noise_std): test.py adopts
    # them from the checkpoint's stored config (stage.adopt_stored_config).
    model_options: Tuple[str, ...] = ()

    def check_model(self, model: nn.Module) -> None:
        """Refuse, with a one-line UserError at set-up, a model the loop cannot train (CROWN-IBP: a Sequential
        the bounds can walk); by default every model is accepted."""

    def train_epoch(self, model: nn.Module, attack_model: nn.Module, batches: Iterable,
                    optimizer: torch.optim.Optimizer, *, epoch: int, num_batches: int, device: torch.device,
                    regularizers: Sequence[Any], bf16: bool, channels_last: bool, print_freq: int,
                    show_progress: bool) -> Dict[str, float]:
        """One epoch over `batches` (0-based `epoch`): the epoch's averages (`train_loss`, `train_acc`,
        `train_examples`, `<regularizer>_mean`, and whatever else the loop reports)."""
        ...


class EpochHook(Protocol):
    """Runs around each epoch (`HOOKS.add(name, builder(cfg, regularizers) -> hook)`)."""

    def before_epoch(self, epoch: int) -> Dict[str, Any]:
        """May set weights (HARP's gamma); returns metrics for the epoch's record."""
        ...

    def after_epoch(self, epoch: int, record: Dict[str, Any]) -> None:
        """Sees the finished record (validation, regularizer measures included)."""
        ...


@runtime_checkable
class Stateful(Protocol):
    """A loop, regularizer or hook with state: saved in every checkpoint under its `state_key` and restored on
    resume by the one generic path (stage.TrainingParts.stateful), so a new method's state needs no checkpoint
    code."""

    state_key: str

    def state_dict(self) -> Dict: ...

    def load_state_dict(self, state: Dict) -> None: ...
