"""The attack contract and registry: every attack test.py, validation and the CLI know is one entry here.

An entry is built from one `EvalSettings` (the threat model plus the run's seed and class count) and reports
the parameters it ran with. Two kinds:

- per-batch attacks (`make(model, threat, settings) -> attack(x, y) -> x_adv`), scored by
  trainers.evaluation.scoring; they can also serve as per-epoch validation attacks (`--attack_eval`);
- whole-set evaluations (`run(model, make_batches, settings, clean) -> result entry`), e.g. AutoAttack, which
  schedules its own batches of survivors.

`fixed` holds what an attack's name fixes in test.py (pgd10: 10 steps with a random start); per-epoch validation
runs the attack under the configured threat model instead, as the original did.

Adding an attack: a module in trainers/evaluation/ that calls `ATTACKS.add(name, AttackSpec(...))`, and its
module name in `_ATTACK_MODULES` below. The CLI choices come from here.
"""
import importlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from configs.errors import UserError
from trainers.attacks.threat import ThreatModel
from utils.registry import Registry

BatchAttack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NATURAL = "natural"  # clean accuracy: always measured, never an attack entry


@dataclass(frozen=True)
class EvalSettings:
    """The threat model and run settings shared by every attack of one evaluation."""
    threat: ThreatModel
    seed: int = 0
    num_classes: int = 10
    preset: str = "standard"        # AutoAttack preset
    aa_batch_size: int = 1000       # AutoAttack survivors per attacked batch
    balanced: bool = False          # also report balanced accuracy (SVHN, as the paper)
    show_progress: bool = True
    # randomized-smoothing certification (trainers/evaluation/certified.py; test.py: **certify_settings(cfg))
    noise_std: float = 0.25         # sigma of the smoothed classifier, [0, 1] input units
    certify_n0: int = 100           # noise draws per point that select the top class
    certify_n: int = 10_000         # noise draws per point that bound its probability (and PREDICT's)
    certify_alpha: float = 0.001    # failure probability of each certificate
    certify_batch_size: int = 1000  # noisy copies per forward
    certify_radii: Optional[Tuple[float, ...]] = None  # certified-accuracy radii (None: Cohen et al.'s grid)
    # FMN (trainers/evaluation/minimum_norm.py; test.py: **fmn_settings(cfg, data, stem))
    fmn_steps: int = 100            # attack steps (the AP preset: the benchmark's 200)
    fmn_tune: int = 0               # configurations tried on the tuning points (0: FMN's default configuration)
    fmn_tune_search: str = "random"  # or "halving" (trainers/attacks/fmn_tune.py)
    tuning_batches: Optional[Callable[[], Iterable[Tuple[torch.Tensor, torch.Tensor]]]] = None  # never test points
    tuning_split: str = ""          # what tuning_batches are, for the result
    artifact_stem: Optional[str] = None  # per-point files go to f"{artifact_stem}_<name>..." (beside the JSON)

    @property
    def eps(self) -> float:
        return self.threat.eps

    @property
    def norm(self) -> str:
        return self.threat.norm

    def with_threat(self, **changes) -> "EvalSettings":
        return replace(self, threat=self.threat.with_(**changes))


@dataclass(frozen=True)
class AttackSpec:
    name: str
    summary: str                                               # one line for --help and the README
    params: Callable[[EvalSettings], Dict[str, Any]]          # what it ran with (settings already fixed)
    make: Optional[Callable[[nn.Module, EvalSettings], BatchAttack]] = None
    run: Optional[Callable[..., Dict[str, Any]]] = None
    fixed: Dict[str, Any] = field(default_factory=dict)       # threat fields its name fixes in test.py
    in_all: bool = True                                        # part of `--attacks all`
    validation: bool = False                                   # offered as --attack_eval

    def settings_for_test(self, settings: EvalSettings) -> EvalSettings:
        return settings.with_threat(**self.fixed) if self.fixed else settings


ATTACKS = Registry("attack")
_ATTACK_MODULES = ("gradient", "apgd", "autoattack", "certified", "minimum_norm")


def _register_attacks() -> None:
    for module in _ATTACK_MODULES:
        importlib.import_module(f"trainers.evaluation.{module}")


def attack(name: str) -> AttackSpec:
    _register_attacks()
    return ATTACKS.get(name)


def _module_rank(name: str) -> int:
    """Position of the attack's module in _ATTACK_MODULES, so the order users see does not depend on which
    module an entry point happened to import first."""
    spec = ATTACKS.get(name)
    module = (spec.make or spec.run).__module__.rpartition(".")[2]
    return _ATTACK_MODULES.index(module) if module in _ATTACK_MODULES else len(_ATTACK_MODULES)


def attack_names() -> List[str]:
    _register_attacks()
    return sorted(ATTACKS.in_order(), key=_module_rank)


def batch_attack_names() -> List[str]:
    return [n for n in attack_names() if ATTACKS.get(n).make is not None]


def validation_attack_names() -> List[str]:
    return [n for n in attack_names() if ATTACKS.get(n).validation]


def suite_names() -> List[str]:
    """What `--attacks all` runs, natural first."""
    return [NATURAL] + [n for n in attack_names() if ATTACKS.get(n).in_all]


def parse_attacks(text: str) -> List[str]:
    """'all' or a comma-separated list of names -> the names in canonical order (natural always first);
    'all,fmn' adds attacks outside 'all'."""
    known = [NATURAL] + attack_names()
    names = [t.strip().lower() for t in str(text).replace(" ", ",").split(",") if t.strip()]
    if not names:
        raise UserError(f"--attacks is empty; choose from: all, {', '.join(known)}")
    if "all" in names:
        names = suite_names() + [n for n in names if n != "all"]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"unknown attack {unknown[0]!r} in --attacks; choose from: all, {', '.join(known)}")
    return [n for n in known if n in names]
