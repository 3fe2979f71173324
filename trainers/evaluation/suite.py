"""test.py's evaluation: every attack's pre-flight check, natural accuracy, then each requested attack over the same
points, and optionally a PGD security curve. Every per-batch attack goes through scoring.score_batches (project,
then score the worst case against the one clean pass); whole-set evaluations (AutoAttack) receive that clean pass.

`torch.manual_seed(seed)` (via utils.seed) runs before each attack, so on the CPU two runs with the same seed
give identical numbers, and an attack gives the same entry whether it runs alone or after others. That is what
lets an interrupted suite go on: when an attack fails, `IncompleteSuite` carries the entries finished so far (the
caller writes them, marked incomplete), and a later `run_suite(..., finished=those entries)` runs only the rest.
"""
import logging
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch.nn as nn

from configs.errors import UserError
from trainers.evaluation.masking_checks import gradient_masking_report
from trainers.evaluation.registry import NATURAL, AttackOptions, AttackSpec, EvalSettings, attack, options_of
from trainers.evaluation.scoring import (Batches, PassResult, accuracy, balanced_accuracy, exceeds_budget,
                                         result_entry, score_batches, stderr, worst_case)
from utils.seed import seed_everything

log = logging.getLogger(__name__)

GRADIENT_MASKING, SECURITY_CURVE = "gradient_masking", "security_curve"  # what runs after the attacks


class IncompleteSuite(Exception):
    """An attack (or the security curve) failed after the clean pass. `suite` is run_suite's output so far, with
    `incomplete` = {'failed': what failed, 'error': its one-line description, 'missing': the attacks not run};
    `cause` is the original exception (re-raise it once the finished entries are written)."""

    def __init__(self, suite: Dict[str, Any], cause: BaseException):
        super().__init__(suite["incomplete"]["error"])
        self.suite, self.cause = suite, cause


def parse_epsilons(text: Optional[str]) -> List[float]:
    """--epsilons: budgets of the security curve, separated by commas or spaces (brackets allowed)."""
    if text is None or not str(text).strip():
        return []
    values = []
    for token in str(text).strip("[]() ").replace(" ", ",").split(","):
        if not token.strip():
            continue
        try:
            value = float(token)
        except ValueError:
            raise UserError(f"bad value {token!r} in --epsilons; give numbers separated by commas, "
                            "e.g. --epsilons 0.01,0.02,0.031") from None
        if value < 0:
            raise UserError(f"--epsilons values must be >= 0, got {value}")
        values.append(value)
    return values


def preflight(model: nn.Module, attacks: Sequence[str], settings: EvalSettings,
              options: Optional[Mapping[str, AttackOptions]] = None, points: Optional[int] = None) -> None:
    """Every requested attack's check of its settings against this model, threat model and number of evaluated
    points (None: not known), before anything is computed: one line naming the attack and the problem."""
    for name in attacks:
        if name == NATURAL:
            continue
        spec = attack(name)
        try:
            spec.check(model, spec.settings_for_test(settings), options_of(name, options), points)
        except UserError as err:
            raise UserError(f"--attacks {name}: {err}") from None


def clean_pass(model: nn.Module, make_batches: Callable[[], Batches], num_batches: Optional[int] = None,
               show_progress: bool = True) -> PassResult:
    result = score_batches(model, make_batches(), collect=True, num_batches=num_batches, desc=NATURAL,
                           show_progress=show_progress)
    if result.labels is None:
        raise UserError("no test examples to evaluate")
    return result


def run_batch_attack(model: nn.Module, spec: AttackSpec, make_batches: Callable[[], Batches], settings: EvalSettings,
                     clean: PassResult, num_batches: Optional[int] = None,
                     options: Optional[AttackOptions] = None) -> Dict[str, Any]:
    """One per-batch attack over the set, under the settings its name fixes; returns its result entry."""
    options = spec.options() if options is None else options
    seed_everything(settings.seed)
    started = time.time()
    attack_fn = spec.make(model, settings, options)
    scored = score_batches(model, make_batches(), clean=False, attack=attack_fn, threat=settings.threat, collect=True,
                           num_batches=num_batches, desc=f"{spec.name} eps={settings.eps:g}",
                           show_progress=settings.show_progress)
    if exceeds_budget(scored.max_raw_norm, settings.eps):
        log.warning("%s returned a perturbation of norm %.6g > eps %.6g; projected back before scoring", spec.name,
                    scored.max_raw_norm, settings.eps)
    return result_entry(settings, clean.labels, worst_case(clean, scored.adv_predictions), time.time() - started,
                        spec.params(settings, options), max_perturbation=scored.max_norm)


def run_attack(model: nn.Module, name: str, make_batches: Callable[[], Batches], settings: EvalSettings,
               clean: PassResult, num_batches: Optional[int] = None,
               options: Optional[AttackOptions] = None) -> Dict[str, Any]:
    """One registered attack under the settings its name fixes in test.py; returns its result entry."""
    spec = attack(name)
    local = spec.settings_for_test(settings)
    options = spec.options() if options is None else options
    if spec.run is not None:
        return spec.run(model, make_batches, local, options, clean)
    return run_batch_attack(model, spec, make_batches, local, clean, num_batches, options)


def run_suite(model: nn.Module, make_batches: Callable[[], Batches], attacks: Sequence[str], settings: EvalSettings,
              num_batches: Optional[int] = None, epsilons: Sequence[float] = (), curve_steps: int = 10, *,
              options: Optional[Mapping[str, AttackOptions]] = None, points: Optional[int] = None,
              finished: Optional[Mapping[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The pre-flight checks, natural accuracy plus each attack in `attacks`; with `epsilons`, a PGD security curve.

    `options`: each attack's options (registry.attack_options; defaults where missing); `points`: how many points
    `make_batches` yields, for the checks; `finished`: entries of attacks that already ran with these settings
    (an incomplete result's), taken as they are.

    Returns {'n', 'natural_acc', 'natural_stderr', ['natural_balanced_acc'], 'attacks': {name: entry},
    'gradient_masking' (trainers/evaluation/masking_checks.py), ['security_curve']}. 'natural' is not an entry of
    'attacks' (it has no eps); `natural_acc` is always there. Raises IncompleteSuite when an attack fails.
    """
    preflight(model, attacks, settings, options, points)
    finished = dict(finished or {})
    started = time.time()
    seed_everything(settings.seed)
    t0 = time.time()
    clean = clean_pass(model, make_batches, num_batches, settings.show_progress)
    n = clean.labels.numel()
    out: Dict[str, Any] = {"n": n, "natural_acc": accuracy(clean.correct)}
    out["natural_stderr"] = stderr(out["natural_acc"], n)
    if settings.balanced:
        out["natural_balanced_acc"] = balanced_accuracy(clean.labels, clean.predictions)
    out["natural_seconds"] = round(time.time() - t0, 3)
    log.info("natural accuracy %.2f%% on %d examples", out["natural_acc"], n)
    results: Dict[str, Any] = {}
    out["attacks"] = results
    names = [name for name in attacks if name != NATURAL]
    step = None
    try:
        for step in names:
            if step in finished:
                results[step] = finished[step]
                log.info("%s: robust accuracy %.2f%% (kept from the incomplete result)", step,
                         results[step]["robust_acc"])
                continue
            results[step] = run_attack(model, step, make_batches, settings, clean, num_batches,
                                       options_of(step, options))
            log.info("%s: robust accuracy %.2f%% (%.1fs)", step, results[step]["robust_acc"], results[step]["seconds"])
        step = GRADIENT_MASKING
        out[GRADIENT_MASKING] = gradient_masking_report(model, make_batches, results, n)
        if epsilons:
            step = SECURITY_CURVE
            out[SECURITY_CURVE] = security_curve(model, make_batches, settings, clean, epsilons, curve_steps,
                                                 num_batches)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - whatever stopped it, keep what finished
        out.pop(GRADIENT_MASKING, None)
        out["incomplete"] = {"failed": step, "error": f"{type(err).__name__}: {err}".splitlines()[0],
                             "missing": [name for name in names if name not in results]}
        out["seconds"] = round(time.time() - started, 3)
        raise IncompleteSuite(out, err) from err
    out["seconds"] = round(time.time() - started, 3)
    return out


def security_curve(model: nn.Module, make_batches: Callable[[], Batches], settings: EvalSettings, clean: PassResult,
                   epsilons: Sequence[float], steps: int = 10,
                   num_batches: Optional[int] = None) -> List[Dict[str, Any]]:
    """PGD-`steps` robust accuracy at each eps; the step size keeps the configured step_size/eps ratio
    (eps/4 for the presets), so every budget gets an equally aggressive attack."""
    ratio = settings.threat.step_size / settings.eps if settings.eps > 0 else 0.25
    spec = attack("pgd")
    curve = []
    for eps in epsilons:
        local = settings.with_threat(eps=float(eps), step_size=float(eps) * ratio, steps=steps, random_start=True)
        if eps == 0:
            entry = {"robust_acc": accuracy(clean.correct), "seconds": 0.0}
        else:
            entry = run_batch_attack(model, spec, make_batches, local, clean, num_batches)
        curve.append({"eps": float(eps), "robust_acc": entry["robust_acc"],
                      "stderr": stderr(entry["robust_acc"], clean.labels.numel()), "steps": steps,
                      "step_size": float(eps) * ratio, "norm": settings.norm, "seconds": entry["seconds"]})
        log.info("security curve: eps %g -> %.2f%%", eps, entry["robust_acc"])
    return curve
