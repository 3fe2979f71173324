"""Hyper-parameter tuning of FMN as HO-FMN does it, without Bayesian optimisation.

HO-FMN (Mura et al., 2024) tunes FMN's step size,
momentum, loss, optimiser and schedule by minimising the median distance over a set of tuning points, failures
counted as +inf, and then attacks other points with the chosen configuration. Here the search is either

- 'random': `n_configs` configurations drawn from the search space, each run for `steps` steps; or
- 'halving': successive halving (Jamieson & Talwalkar, AISTATS 2016) over the same draws, with attack steps as
  the budget: every round keeps the best 1/eta of the configurations and multiplies their steps by eta (never
  fewer than MIN_HALVING_STEPS), the last round runs `steps` steps, and the choice is the best configuration of
  that last round. With n configurations it costs about eta * log_eta(n) full runs instead of n.

Configurations are compared by the median distance over the tuning points the model classifies correctly
(the others have distance 0 under every configuration); ties go to more points broken, then the smaller mean
finite distance, then the earlier draw. The caller guarantees the tuning points are disjoint from the points it
evaluates; this module only ever reads `tuning_batches` (once) and attacks nothing else.
"""
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from configs.errors import UserError
from trainers.attacks.fmn import DEFAULT_STEPS, EPS_STARTS, LOSSES, OPTIMIZERS, SCHEDULES, FMNConfig, fmn_batches
from trainers.attacks.threat import LINF

log = logging.getLogger(__name__)

SEARCHES = ("random", "halving")
HALVING_ETA = 2
MIN_HALVING_STEPS = 10


@dataclass(frozen=True)
class SearchSpace:
    """HO-FMN's space: alpha_init log-uniform (HO-FMN: [8/255, 10]), momentum uniform in [0, 0.9], and the
    categorical choices; eps_start only matters for the 'ld' loss. `alpha_final` is fixed, not searched (None:
    alpha_init / 100, FMN's default; HO-FMN's cosine annealing ends at 0)."""
    alpha_init: Tuple[float, float] = (0.01, 10.0)
    momentum: Tuple[float, float] = (0.0, 0.9)
    losses: Tuple[str, ...] = LOSSES
    optimizers: Tuple[str, ...] = OPTIMIZERS
    schedules: Tuple[str, ...] = SCHEDULES
    eps_starts: Tuple[str, ...] = EPS_STARTS
    alpha_final: Optional[float] = None

    def sample(self, rng: np.random.Generator) -> FMNConfig:
        low, high = self.alpha_init
        return FMNConfig(
            loss=str(rng.choice(self.losses)), optimizer=str(rng.choice(self.optimizers)),
            schedule=str(rng.choice(self.schedules)), eps_start=str(rng.choice(self.eps_starts)),
            alpha_init=float(math.exp(rng.uniform(math.log(low), math.log(high)))), alpha_final=self.alpha_final,
            momentum=float(rng.uniform(*self.momentum))).validated()


@dataclass
class TuneResult:
    """`config`: the chosen FMN keywords (JSON-serialisable; `fmn(..., **config)`); `trials`: one row per run
    (trial, round, steps, the configuration, median_distance and mean_finite_distance over the correctly
    classified tuning points (+inf where nothing was found), found_rate in percent of them, n_points, seconds)."""
    config: Dict[str, Any]
    trials: List[Dict[str, Any]]
    best_trial: int
    params: Dict[str, Any] = field(default_factory=dict)


def _score(distances: torch.Tensor, clean_correct: torch.Tensor) -> Tuple[float, float, float]:
    d = distances[clean_correct]
    finite = d[torch.isfinite(d)]
    mean_finite = float(finite.mean()) if finite.numel() else math.inf
    return float(d.median()), float(torch.isfinite(d).double().mean()), mean_finite


def _run_trial(model: nn.Module, batches: List[Tuple[torch.Tensor, torch.Tensor]], config: FMNConfig, steps: int,
               norm: str, clip_min: float, clip_max: float) -> Tuple[torch.Tensor, torch.Tensor, float]:
    started = time.perf_counter()
    result = fmn_batches(model, batches, norm=norm, steps=steps, clip_min=clip_min, clip_max=clip_max,
                         **asdict(config))
    return result.distances, result.clean_correct, time.perf_counter() - started


def _rank_key(row: Dict[str, Any]) -> Tuple[float, float, float, int]:
    return row["median_distance"], -row["found_rate"], row["mean_finite_distance"], row["trial"]


def _halving_rounds(n_configs: int, eta: int) -> int:
    rounds = 1
    while eta ** rounds < n_configs:
        rounds += 1
    return rounds


def tune_fmn(model: nn.Module, tuning_batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], n_configs: int, *,
             search: str = "random", seed: int = 0, norm: str = LINF, steps: int = DEFAULT_STEPS,
             space: SearchSpace = SearchSpace(), eta: int = HALVING_ETA, clip_min: float = 0.0,
             clip_max: float = 1.0) -> TuneResult:
    """Try `n_configs` FMN configurations on the tuning points and return the one with the smallest median
    distance (module docstring). Deterministic for a given seed: FMN itself draws no random numbers."""
    if search not in SEARCHES:
        raise UserError(f"FMN tuning search {search!r} is not one of {', '.join(SEARCHES)}")
    if n_configs < 1 or eta < 2:
        raise UserError(f"FMN tuning needs n_configs >= 1 and eta >= 2, got {n_configs} and {eta}")
    batches = [(x, y) for x, y in tuning_batches]
    rng = np.random.default_rng(seed)
    configs = [space.sample(rng) for _ in range(n_configs)]

    rounds = _halving_rounds(n_configs, eta) if search == "halving" else 1
    alive = list(range(n_configs))
    trials: List[Dict[str, Any]] = []
    for r in range(rounds):
        shortened = max(MIN_HALVING_STEPS, steps // eta ** (rounds - 1 - r))
        round_steps = steps if r == rounds - 1 else min(steps, shortened)
        rows = []
        for i in alive:
            distances, clean, seconds = _run_trial(model, batches, configs[i], round_steps, norm, clip_min, clip_max)
            if not clean.any():
                raise UserError("the FMN tuning points contain no correctly classified point")
            median, found, mean_finite = _score(distances, clean)
            rows.append(dict(trial=i, round=r, steps=round_steps, **asdict(configs[i]), median_distance=median,
                             found_rate=100.0 * found, mean_finite_distance=mean_finite, n_points=int(clean.numel()),
                             seconds=round(seconds, 3)))
            log.info("FMN tuning round %d trial %d (%d steps): median distance %.5g, %.1f%% broken", r, i,
                     round_steps, median, 100.0 * found)
        trials += rows
        ranked = sorted(rows, key=_rank_key)
        alive = [row["trial"] for row in ranked[:max(1, math.ceil(len(ranked) / eta))]]
    best = min((row for row in trials if row["round"] == rounds - 1), key=_rank_key)
    config = asdict(configs[best["trial"]])
    log.info("FMN tuning chose trial %d: %s (median distance %.5g)", best["trial"], config, best["median_distance"])
    return TuneResult(config=config, trials=trials, best_trial=best["trial"],
                      params=dict(search=search, seed=seed, norm=norm, steps=steps, n_configs=n_configs,
                                  eta=eta if search == "halving" else None, rounds=rounds,
                                  n_points=trials[0]["n_points"]))
