"""The attack contract and registry: every attack test.py, validation and the CLI know is one entry here.

An attack is one `AttackSpec`, registered once by its module:

- its options: a frozen dataclass of its own (`AttackOptions` subclass) with `from_config(cfg, context)`, so
  test.py builds every attack's options in one loop (`attack_options`) and names no attack;
- its pre-flight `check(model, settings, options, points)` (required): raises a one-line UserError for settings
  that cannot work with this model, threat model or number of points, before anything is computed
  (suite.preflight runs every requested attack's before the clean pass and prefixes the attack's name);
- what it runs, one of two kinds:
  per-batch attacks (`make(model, settings, options) -> attack(x, y) -> x_adv`, scored by
  trainers.evaluation.scoring, their `params(settings, options)` recorded in the entry); they can also serve as
  per-epoch validation attacks (`--attack_eval`), with their default options;
  whole-set evaluations (`run(model, make_batches, settings, options, clean) -> result entry`), e.g. AutoAttack,
  which schedule their own batches and write their own entry.

`EvalSettings` holds only what every attack uses: the threat model, the seed, the class count, the preset, the
counting of balanced accuracy and progress bars. `fixed` holds what an attack's name fixes in test.py (pgd10: 10
steps with a random start); per-epoch validation runs the attack under the configured threat model instead, as the
original did. `artifacts` names the entry keys that hold files written beside the result JSON (report.py copies
them with the JSON).

Adding an attack: a module in trainers/evaluation/ that calls `ATTACKS.add(name, AttackSpec(...))`, its module name
in `_ATTACK_MODULES` below, and, for an option, one field of configs/schema.py's Config that its options read.
tests/toy_attack.py is a complete example. The CLI choices and `--attacks help` come from here.
"""
import importlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Type

import torch
import torch.nn as nn

from configs.errors import UserError
from trainers.attacks.threat import ThreatModel
from trainers.evaluation.scoring import BatchAttack
from utils.registry import Registry

NATURAL = "natural"  # clean accuracy: always measured, never an attack entry
HELP = "help"        # --attacks help: list the attacks with their summaries


@dataclass(frozen=True)
class EvalSettings:
    """The threat model and run settings shared by every attack of one evaluation."""
    threat: ThreatModel
    seed: int = 0
    num_classes: int = 10
    preset: str = "standard"        # AutoAttack preset, and the AP benchmark's protocol ('ap')
    balanced: bool = False          # also report balanced accuracy (the dataset's description decides: SVHN)
    show_progress: bool = True

    @property
    def eps(self) -> float:
        return self.threat.eps

    @property
    def norm(self) -> str:
        return self.threat.norm

    def with_threat(self, **changes) -> "EvalSettings":
        return replace(self, threat=self.threat.with_(**changes))


@dataclass(frozen=True)
class EvalContext:
    """What an attack's options may be built from besides the config: the run's DataSource (e.g. FMN's tuning
    points, never test points), the device, and the stem of the result JSON (per-point files go to
    f"{artifact_stem}_<name>..." beside it). Empty in library use (tests): options then take their defaults."""
    data: Any = None
    device: Optional[torch.device] = None
    artifact_stem: Optional[str] = None


class AttackOptions:
    """Base of an attack's own options (a frozen dataclass). `from_config` reads the attack's config fields."""

    @classmethod
    def from_config(cls, cfg, context: EvalContext) -> "AttackOptions":
        return cls()


@dataclass(frozen=True)
class NoOptions(AttackOptions):
    """An attack whose name fixes everything it does."""


@dataclass(frozen=True)
class AttackSpec:
    name: str
    summary: str                                               # one line for --attacks help
    make: Optional[Callable[[nn.Module, EvalSettings, Any], BatchAttack]] = None
    params: Optional[Callable[[EvalSettings, Any], Dict[str, Any]]] = None  # what a per-batch attack ran with
    run: Optional[Callable[..., Dict[str, Any]]] = None
    options: Type[AttackOptions] = NoOptions
    check: Optional[Callable[[nn.Module, EvalSettings, Any, Optional[int]], None]] = None  # required
    artifacts: Tuple[str, ...] = ()                           # entry keys naming files beside the result JSON
    fixed: Dict[str, Any] = field(default_factory=dict)       # threat fields its name fixes in test.py
    in_all: bool = True                                        # part of `--attacks all`
    validation: bool = False                                   # offered as --attack_eval

    def __post_init__(self):
        if (self.make is None) == (self.run is None):
            raise ValueError(f"attack {self.name!r}: give exactly one of make (per batch) and run (whole set)")
        if (self.make is None) != (self.params is None):
            raise ValueError(f"attack {self.name!r}: a per-batch attack records its params; a whole-set one writes "
                             "its own entry")
        if self.check is None:
            raise ValueError(f"attack {self.name!r}: declare its pre-flight check of the settings (check=...)")

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
        raise UserError(f"--attacks is empty; choose from: all, {', '.join(known)} (or help)")
    if "all" in names:
        names = suite_names() + [n for n in names if n != "all"]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"unknown attack {unknown[0]!r}; choose from: all, {', '.join(known)} (or {HELP})")
    return [n for n in known if n in names]


def wants_help(text: str) -> bool:
    return str(text).strip().lower() == HELP


def attack_help() -> List[str]:
    """One line per attack: its name, its summary, and whether `--attacks all` runs it."""
    names = attack_names()
    width = max(len(n) for n in [NATURAL] + names)
    lines = [f"{NATURAL:<{width}}  clean accuracy of the evaluated points (always measured)"]
    for name in names:
        spec = ATTACKS.get(name)
        lines.append(f"{name:<{width}}  {spec.summary}" + ("" if spec.in_all else "  [not in 'all']"))
    return lines


def attack_options(names: Iterable[str], cfg, context: EvalContext) -> Dict[str, AttackOptions]:
    """Every named attack's options, built from the config by the attack itself (test.py's one loop)."""
    return {name: attack(name).options.from_config(cfg, context) for name in names if name != NATURAL}


def options_of(name: str, options: Optional[Dict[str, AttackOptions]]) -> AttackOptions:
    """The attack's options from `options`, else its defaults."""
    given = (options or {}).get(name)
    return attack(name).options() if given is None else given
