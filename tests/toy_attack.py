"""A toy attack added as a plug-in: random points of the eps-ball, `draws` tries per point, the first that fools the
model kept.

This module is everything the attack needs — its options (a frozen dataclass built from the config), its pre-flight
check and its spec, registered once — and it touches neither test.py, the attack registry, EvalSettings nor the
suite. Its one option reads a field of Config: a new attack's option is one new field in configs/schema.py; the toy
reads --num-steps, so the tests need no schema edit.
"""
from dataclasses import dataclass

import torch

from configs.errors import UserError
from trainers.attacks.threat import project, random_start
from trainers.evaluation.registry import ATTACKS, AttackOptions, AttackSpec
from utils.modes import eval_mode

NAME = "noise"


@dataclass(frozen=True)
class NoiseOptions(AttackOptions):
    draws: int = 1  # random points tried per evaluated point

    @classmethod
    def from_config(cls, cfg, context) -> "NoiseOptions":
        return cls(draws=cfg.num_steps)


def check_noise(model, settings, options: NoiseOptions, points) -> None:
    if options.draws < 1:
        raise UserError(f"needs at least one draw per point, got --num-steps {options.draws}")


def make_noise(model, settings, options: NoiseOptions):
    threat = settings.threat

    def attack(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        best, open_ = x.clone(), torch.ones_like(y, dtype=torch.bool)
        with eval_mode(model), torch.no_grad():
            for _ in range(options.draws):
                x_try = project(random_start(x, threat), x, threat)
                fooled = open_ & (model(x_try).argmax(dim=1) != y)
                best[fooled], open_ = x_try[fooled], open_ & ~fooled
        return best
    return attack


def install() -> None:
    if NAME in ATTACKS:
        return
    ATTACKS.add(NAME, AttackSpec(
        NAME, "random points of the eps-ball, --num-steps draws per point (tests/toy_attack.py)", make=make_noise,
        params=lambda settings, options: dict(draws=options.draws), options=NoiseOptions, check=check_noise,
        in_all=False))
