"""test.py's `fmn`: minimal adversarial distances from FMN (trainers/attacks/fmn.py), and the security curve they give.

One FMN run gives every evaluated point its smallest adversarial perturbation found, so the robust accuracy at
every eps follows at once (the AP benchmark's HO-FMN evaluation and security curves). The entry reports

    robust_acc        percent of points with distance > eps at the threat model's eps (the AP preset: at 8/255)
    curve             [{eps, robust_acc}] on a fixed grid: eps * i / 8 for i = 0 .. 24 (0 to 3 eps); AP: 1,000
                      eps evenly spaced in [0, 0.15] as the benchmark's plots
    median_distance   over the points classified correctly on clean input, failures +inf (None when more than
                      half of them were never broken)
    distances_file    a torch file beside the result JSON (name relative to the JSON's folder): per point the
                      distance (0 for clean errors, +inf where FMN found nothing), clean correctness, label and
                      test-set index
    config, tuning    the FMN configuration that ran and, with --fmn-tune N, how it was chosen

Counting. Default: a point FMN never broke has distance +inf and is robust at every eps (the attack's failure is
not evidence against the model, and AutoAttack counts it the same way); clean errors have distance 0 and are
never robust, as every attack of test.py counts them. The AP preset counts as HO-FMN does: failures get
distance 0, i.e. count as broken (`trainers.attacks.fmn.failures_as_zero`).

Tuning (--fmn-tune N, trainers/attacks/fmn_tune.py) never sees an evaluated point: by default it runs on the held-out
validation split when test.py has one (--val-split > 0), else on the first --fmn-tune-points training images
(epoch 0's shuffled order for --seed, with the training augmentation); the AP preset tunes on test points [0, 64)
and attacks [2048, 2176), as the benchmark.
"""
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from configs.errors import UserError
from trainers.attacks.fmn import FMNConfig, failures_as_zero, fmn_batches, security_curve
from trainers.attacks.fmn_tune import SearchSpace, tune_fmn
from trainers.evaluation.ap_protocol import (AP_EPS, AP_EVAL_POINTS, AP_NORM, AP_PRESET, AP_SEARCH_SPACE, AP_STEPS,
                                             AP_TUNE_POINTS, AP_TUNE_STEPS, AP_TUNE_TRIALS, ap_eps_grid)
from trainers.evaluation.registry import ATTACKS, AttackOptions, AttackSpec, EvalContext, EvalSettings
from trainers.evaluation.scoring import Batches, PassResult, result_entry, worst_case
from utils.atomic import atomic_write
from utils.seed import seed_everything

log = logging.getLogger(__name__)

FMN = "fmn"
CURVE_STEPS_PER_EPS = 8        # default curve: eps / 8 apart ...
CURVE_EPS_MULTIPLES = 3        # ... up to 3 eps (25 budgets, eps itself among them)
DISTANCES_SUFFIX = "_fmn_distances.pt"
DISTANCES_FILE = "distances_file"   # the entry key naming it (relative to the result JSON's folder)
DISTANCES_FORMAT = 1
FAILURES_INF, FAILURES_ZERO = "failures_inf", "failures_zero"
_NO_TUNING_POINTS = "FMN tuning (--fmn-tune) needs tuning points disjoint from the evaluated ones; none were given"


# ----------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class FMNOptions(AttackOptions):
    steps: int = 100                # attack steps (the AP preset: the benchmark's 200)
    tune: int = 0                   # configurations tried on the tuning points (0: FMN's default configuration)
    tune_search: str = "random"     # or "halving" (trainers/attacks/fmn_tune.py)
    tuning_batches: Optional[Callable[[], Batches]] = None  # never test points
    tuning_split: str = ""          # what tuning_batches are, for the result
    artifact_stem: Optional[str] = None  # the distances file goes to f"{artifact_stem}{DISTANCES_SUFFIX}"

    @classmethod
    def from_config(cls, cfg, context: EvalContext) -> "FMNOptions":
        """--fmn-steps, --fmn-tune, --fmn-tune-search; tuning points from the run's data (--fmn-tune-points)."""
        batches, split = (None, "") if context.data is None else tuning_points(context.data, cfg.fmn_tune_points,
                                                                                cfg.seed)
        return cls(steps=cfg.fmn_steps, tune=cfg.fmn_tune, tune_search=cfg.fmn_tune_search, tuning_batches=batches,
                   tuning_split=split, artifact_stem=context.artifact_stem)


def tuning_points(data, points: int, seed: int) -> Tuple[Callable[[], Batches], str]:
    """Tuning batches disjoint from every test point, and what they are: the validation split when the data has
    one (held out from training), else the first `points` training images of epoch 0's order for `seed`."""
    if points < 1:
        raise UserError(f"--fmn-tune-points must be positive, got {points}")
    if data.num_val:
        n = min(points, data.num_val)
        return (lambda: _first(data.val_batches(n), n)), f"validation split: the first {n} held-out training images"
    n = min(points, data.num_train)
    return (lambda: _first(data.train_batches(n, epoch=0, seed=seed), n),
            f"training set: the first {n} images of epoch 0's shuffled order (seed {seed}, training augmentation)")


def _first(batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], n: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The first `n` points of `batches`."""
    for x, y in batches:
        if n <= 0:
            return
        yield x[:n], y[:n]
        n -= y.shape[0]


def _points_in(batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], start: int, end: int
               ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The points with positions [start, end) in the order `batches` yields them."""
    offset = 0
    for x, y in batches:
        b = y.shape[0]
        lo, hi = max(start - offset, 0), min(end - offset, b)
        if lo < hi:
            yield x[lo:hi], y[lo:hi]
        offset += b
        if offset >= end:
            return


# ----------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class FMNPlan:
    """What one FMN evaluation runs: positions [start, end) of the evaluated points, steps, the tuning (trials
    0: FMN's default configuration), the eps that robust_acc is read at, the counting and the curve's grid."""
    norm: str
    eps: float
    points: Tuple[int, int]
    steps: int
    trials: int
    tune_steps: int
    space: SearchSpace
    tune_points: Optional[Tuple[int, int]]       # positions among the evaluated points (AP), else the tuning split
    counting: str
    grid: List[float]
    deviations: List[str] = field(default_factory=list)


def default_eps_grid(eps: float) -> List[float]:
    """0, eps/8, ..., 3 eps (multiplying and dividing by 8 is exact, so eps itself is on the grid)."""
    if eps <= 0:
        return [0.0]
    return [eps * i / CURVE_STEPS_PER_EPS for i in range(CURVE_STEPS_PER_EPS * CURVE_EPS_MULTIPLES + 1)]


def default_plan(settings: EvalSettings, options: FMNOptions, n: int) -> FMNPlan:
    losses = tuple(l for l in SearchSpace().losses if settings.num_classes >= 3 or l != "dlr")
    return FMNPlan(norm=settings.norm, eps=settings.eps, points=(0, n), steps=options.steps, trials=options.tune,
                   tune_steps=options.steps, space=SearchSpace(losses=losses), tune_points=None,
                   counting=FAILURES_INF, grid=default_eps_grid(settings.eps))


def fmn_plan(settings: EvalSettings, options: FMNOptions, n: int) -> FMNPlan:
    """The run of `n` evaluated points: the AP benchmark's under its preset, else the configured one."""
    return ap_fmn_plan(options, n) if settings.preset == AP_PRESET else default_plan(settings, options, n)


def ap_fmn_plan(options: FMNOptions, n: int) -> FMNPlan:
    """HO-FMN as the benchmark runs it on `n` evaluated test points (the first ones of the test set). With fewer
    than 2,176 points the attack takes the up to 128 points right after the tuning points, recorded as a
    deviation."""
    tune_start, tune_end = AP_TUNE_POINTS
    start, end = AP_EVAL_POINTS
    deviations = []
    if n <= tune_end:
        raise UserError(f"--attack-preset ap: FMN tunes on test points [{tune_start}, {tune_end}) and needs more "
                        f"test points than that; {n} evaluated")
    if n < end:
        start, end = tune_end, min(n, tune_end + (AP_EVAL_POINTS[1] - AP_EVAL_POINTS[0]))
        deviations.append(f"{n} evaluated test points: FMN attacked points [{start}, {end}) instead of "
                          f"[{AP_EVAL_POINTS[0]}, {AP_EVAL_POINTS[1]})")
    trials = options.tune or AP_TUNE_TRIALS
    if trials != AP_TUNE_TRIALS:
        deviations.append(f"--fmn-tune {trials}: the benchmark tunes {AP_TUNE_TRIALS} trials")
    return FMNPlan(norm=AP_NORM, eps=AP_EPS, points=(start, end), steps=AP_STEPS, trials=trials,
                   tune_steps=AP_TUNE_STEPS, space=AP_SEARCH_SPACE, tune_points=(tune_start, tune_end),
                   counting=FAILURES_ZERO, grid=ap_eps_grid(), deviations=deviations)


def check_fmn(model: nn.Module, settings: EvalSettings, options: FMNOptions, points: Optional[int]) -> None:
    """Tuning points where tuning needs them, enough evaluated points and classes for the AP preset's HO-FMN."""
    if points is not None:
        fmn_plan(settings, options, points)
    if options.tune and settings.preset != AP_PRESET and options.tuning_batches is None:
        raise UserError(_NO_TUNING_POINTS)
    if settings.preset == AP_PRESET and settings.num_classes < 3:
        raise UserError(f"--attack-preset {AP_PRESET} tunes FMN on the DLR loss, which needs at least 3 classes; the "
                        f"model has {settings.num_classes}")


# ----------------------------------------------------------------------------------------------- the entry
def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def _json_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Tuning rows with +inf (nothing found) as None: JSON has no infinity."""
    return [{k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in row.items()} for row in rows]


def _tune(model: nn.Module, plan: FMNPlan, settings: EvalSettings, options: FMNOptions,
          make_batches: Callable[[], Batches]) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """The configuration FMN runs with and, when tuned, the tuning's record."""
    if not plan.trials:
        return asdict(FMNConfig()), None
    if plan.tune_points is not None:
        batches = list(_points_in(make_batches(), *plan.tune_points))
        split = f"test points [{plan.tune_points[0]}, {plan.tune_points[1]})"
    elif options.tuning_batches is not None:
        batches, split = list(options.tuning_batches()), options.tuning_split
    else:
        raise UserError(_NO_TUNING_POINTS)
    started = time.time()
    tuned = tune_fmn(model, batches, plan.trials, search=options.tune_search, seed=settings.seed,
                     norm=plan.norm, steps=plan.tune_steps, space=plan.space, clip_min=settings.threat.clip_min,
                     clip_max=settings.threat.clip_max)
    record = dict(tuned.params, split=split, best_trial=tuned.best_trial, seconds=round(time.time() - started, 3),
                  trials=_json_rows(tuned.trials))
    if plan.tune_points is not None:
        record["points"] = list(plan.tune_points)
    return tuned.config, record


def fmn_entry(model: nn.Module, make_batches: Callable[[], Batches], settings: EvalSettings, options: FMNOptions,
              clean: PassResult) -> Dict[str, Any]:
    """test.py's `fmn`: FMN over the evaluated points (the AP preset: the benchmark's points), one result entry
    (module docstring)."""
    seed_everything(settings.seed)
    started = time.time()
    plan = fmn_plan(settings, options, clean.labels.numel())
    config, tuning = _tune(model, plan, settings, options, make_batches)
    start, end = plan.points
    result = fmn_batches(model, _points_in(make_batches(), start, end), norm=plan.norm, steps=plan.steps,
                         clip_min=settings.threat.clip_min, clip_max=settings.threat.clip_max, **config)
    labels, clean_correct = clean.labels[start:end], clean.correct[start:end]
    if not torch.equal(result.clean_correct, clean_correct):
        log.warning("fmn: %d points are classified differently than in the clean pass (a randomised model?)",
                    int((result.clean_correct != clean_correct).sum()))
    distances = result.distances.clone()
    distances[~clean_correct] = 0.0  # one clean pass decides clean errors, as for every attack
    counted = failures_as_zero(distances) if plan.counting == FAILURES_ZERO else distances
    robust = counted > plan.eps

    correct = distances[clean_correct]
    median = float(correct.median()) if correct.numel() else math.inf
    broken = counted[(counted <= plan.eps) & clean_correct]
    failures = int((clean_correct & torch.isinf(distances)).sum())
    sub = PassResult(sums={}, labels=labels, predictions=clean.predictions[start:end])
    prediction = torch.where(robust, labels, torch.full_like(labels, -1))
    threat = settings.with_threat(eps=plan.eps, norm=plan.norm)
    params = dict(implementation="trainers.attacks.fmn", steps=plan.steps, points=[start, end], counting=plan.counting,
                  config=config, tuning=tuning, seed=settings.seed)
    if plan.deviations:
        params["deviations"] = plan.deviations
    entry = result_entry(threat, labels, worst_case(sub, prediction), time.time() - started, params,
                         max_perturbation=float(broken.max()) if broken.numel() else 0.0,
                         curve=security_curve(counted, plan.grid), median_distance=_finite_or_none(median),
                         n_points=end - start, clean_errors=int((~clean_correct).sum()), failures=failures,
                         **{DISTANCES_FILE: None})
    if options.artifact_stem:
        entry[DISTANCES_FILE] = write_distances(options.artifact_stem, distances, clean_correct, labels,
                                                torch.arange(start, end), plan)
    log.info("fmn: robust accuracy %.2f%% at eps %g (%s), median distance %s, %d of %d correctly classified points "
             "never broken", entry["robust_acc"], plan.eps, plan.norm,
             "inf" if not math.isfinite(median) else f"{median:.5g}", failures, int(clean_correct.sum()))
    return entry


# ----------------------------------------------------------------------------------------------- the file
def distances_path(artifact_stem: str) -> str:
    return f"{artifact_stem}{DISTANCES_SUFFIX}"


def write_distances(artifact_stem: str, distances: torch.Tensor, clean_correct: torch.Tensor, labels: torch.Tensor,
                    indices: torch.Tensor, plan: FMNPlan) -> str:
    """Write the per-point file (atomically) and return its name relative to the result JSON's folder."""
    path = distances_path(artifact_stem)
    record = {"format": DISTANCES_FORMAT, "attack": FMN, "norm": plan.norm, "eps": plan.eps,
              "counting": plan.counting, "distances": distances.double().cpu(),
              "clean_correct": clean_correct.bool().cpu(), "labels": labels.long().cpu(),
              "indices": indices.long().cpu()}
    atomic_write(path, lambda fh: torch.save(record, fh), binary=True)
    return os.path.basename(path)


def resolve_distances_file(result_path: str, entry: Dict[str, Any]) -> str:
    """The distances file of an `fmn` entry of the result JSON at `result_path` (its name is relative to the
    JSON's folder)."""
    name = entry.get(DISTANCES_FILE)
    if not name:
        raise UserError(f"{result_path}: its fmn entry has no distances file (evaluated without a result folder)")
    path = os.path.join(os.path.dirname(os.path.abspath(result_path)), name)
    if not os.path.isfile(path):
        raise UserError(f"{result_path}: the distances file {path} is missing (keep it beside the result JSON)")
    return path


def read_distances(path: str) -> Dict[str, Any]:
    """A distances file as written by `write_distances` (tensors on the CPU)."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"cannot read the distances file {path}: {err}") from None
    if not isinstance(record, dict) or record.get("attack") != FMN or "distances" not in record:
        raise UserError(f"{path} is not an FMN distances file")
    return record


def counted_distances(record: Dict[str, Any]) -> torch.Tensor:
    """The distances as the run counted them (failures +inf, or 0 under the AP preset's counting)."""
    distances = record["distances"].double()
    return failures_as_zero(distances) if record.get("counting") == FAILURES_ZERO else distances


ATTACKS.add(FMN, AttackSpec(
    FMN, "FMN minimum-norm attack (Pintor et al. 2021): per-point minimal distances, robust accuracy at eps and the "
    "security curve in one run; --fmn-steps, --fmn-tune N", run=fmn_entry, options=FMNOptions, check=check_fmn,
    artifacts=(DISTANCES_FILE,), in_all=False))
