"""test.py's evaluation: natural accuracy, then each requested attack over the same points, and optionally a
PGD security curve. Every per-batch attack goes through scoring.score_batches (project, then score the worst case
against the one clean pass); whole-set evaluations (AutoAttack) receive that clean pass.

`torch.manual_seed(seed)` (via utils.seed) runs before each attack, so on the CPU two runs with the same seed
give identical numbers.
"""
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch.nn as nn

from configs.errors import UserError
from trainers.evaluation.masking_checks import gradient_masking_report
from trainers.evaluation.registry import NATURAL, AttackSpec, EvalSettings, attack
from trainers.evaluation.scoring import (Batches, PassResult, accuracy, balanced_accuracy, exceeds_budget,
                                         result_entry, score_batches, stderr, worst_case)
from utils.seed import seed_everything

log = logging.getLogger(__name__)


def clean_pass(model: nn.Module, make_batches: Callable[[], Batches], num_batches: Optional[int] = None,
               show_progress: bool = True) -> PassResult:
    result = score_batches(model, make_batches(), collect=True, num_batches=num_batches, desc=NATURAL,
                           show_progress=show_progress)
    if result.labels is None:
        raise UserError("no test examples to evaluate")
    return result


def run_batch_attack(model: nn.Module, spec: AttackSpec, make_batches: Callable[[], Batches], settings: EvalSettings,
                     clean: PassResult, num_batches: Optional[int] = None) -> Dict[str, Any]:
    """One per-batch attack over the set, under the settings its name fixes; returns its result entry."""
    seed_everything(settings.seed)
    started = time.time()
    attack_fn = spec.make(model, settings)
    scored = score_batches(model, make_batches(), clean=False, attack=attack_fn, threat=settings.threat, collect=True,
                           num_batches=num_batches, desc=f"{spec.name} eps={settings.eps:g}",
                           show_progress=settings.show_progress)
    if exceeds_budget(scored.max_raw_norm, settings.eps):
        log.warning("%s returned a perturbation of norm %.6g > eps %.6g; projected back before scoring", spec.name,
                    scored.max_raw_norm, settings.eps)
    return result_entry(settings, clean.labels, worst_case(clean, scored.adv_predictions), time.time() - started,
                        spec.params(settings), max_perturbation=scored.max_norm)


def run_suite(model: nn.Module, make_batches: Callable[[], Batches], attacks: Sequence[str], settings: EvalSettings,
              num_batches: Optional[int] = None, epsilons: Sequence[float] = (),
              curve_steps: int = 10) -> Dict[str, Any]:
    """Natural accuracy plus each attack in `attacks`; with `epsilons`, a PGD security curve.

    Returns {'n', 'natural_acc', 'natural_stderr', ['natural_balanced_acc'], 'attacks': {name: entry},
    'gradient_masking' (trainers/evaluation/masking_checks.py), ['security_curve']}. 'natural' is not an entry of
    'attacks' (it has no eps); `natural_acc` is always there.
    """
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
    for name in attacks:
        if name == NATURAL:
            continue
        spec = attack(name)
        local = spec.settings_for_test(settings)
        if spec.run is not None:
            results[name] = spec.run(model, make_batches, local, clean)
        else:
            results[name] = run_batch_attack(model, spec, make_batches, local, clean, num_batches)
        log.info("%s: robust accuracy %.2f%% (%.1fs)", name, results[name]["robust_acc"], results[name]["seconds"])
    out["attacks"] = results
    out["gradient_masking"] = gradient_masking_report(model, make_batches, results)
    if epsilons:
        out["security_curve"] = security_curve(model, make_batches, settings, clean, epsilons, curve_steps,
                                               num_batches)
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
