"""`--attack-preset ap`: the evaluation protocol of the Adversarial Pruning (AP) benchmark (Piras et al. 2024,
pralab/AdversarialPruningBenchmark; Piras et al. 2024, Mura et al. 2024).

The benchmark evaluates every model twice:

- official AutoAttack "standard" (APGD-CE, APGD-T, FAB-T, Square; 100 iterations, 9 targets, 5000 queries) in
  Linf at eps 0.031 (not 8/255) on the first 10,000 test points in batches of 500; it reports AutoAttack's
  "initial accuracy" and "robust accuracy" in percent;
- HO-FMN: FMN with the DLR loss, SGD on the sign of the gradient and a cosine-annealed step, tuned over 32 trials
  of 100 steps on test points [0, 64), then run for 200 steps on test points [2048, 2176); a point's distance is
  ||x_adv - x||_inf, points FMN never broke count as distance 0 (broken), and the robust accuracy is the
  *fraction* of the 128 points with distance > 8/255. Its security curve takes 1,000 eps in [0, 0.15].

This module holds the protocol's constants, turns test.py's config into the protocol's (`ap_config`), and
writes the record that states every protocol setting with the numbers in the benchmark's units
(`protocol_record`). FMN's part is in trainers/evaluation/minimum_norm.py (`ap_fmn_plan`).
"""
import dataclasses
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from trainers.attacks.fmn_tune import SearchSpace
from trainers.attacks.threat import LINF
from trainers.evaluation.registry import NATURAL, parse_attacks

log = logging.getLogger(__name__)

AP_PRESET = "ap"
AP_AA_EPS = 0.031            # AutoAttack's budget in the benchmark (utils/test.test_model_aa), Linf, [0, 1] inputs
AP_AA_POINTS = 10_000        # the first 10,000 test points (SVHN's 26,032 are truncated)
AP_AA_BATCH = 500
AP_DATASETS = ("CIFAR10", "SVHN")
AP_ATTACKS = (NATURAL, "autoattack", "fmn")  # what `--attacks all` runs under the preset
BENCHMARK = "Adversarial Pruning benchmark (Piras et al. 2024, pralab/AdversarialPruningBenchmark)"
# HO-FMN (Mura et al. 2024) as the benchmark runs it: 32 trials of 100 steps on test points [0, 64), then 200 steps
# in Linf on test points [2048, 2176); robust accuracy thresholded at 8/255, the curve at 1,000 eps in [0, 0.15].
AP_NORM = LINF
AP_TUNE_STEPS, AP_TUNE_TRIALS, AP_TUNE_POINTS = 100, 32, (0, 64)
AP_STEPS, AP_EVAL_POINTS = 200, (2048, 2176)
AP_EPS = 8 / 255
AP_CURVE_EPS_MAX, AP_CURVE_POINTS = 0.15, 1000
# HO-FMN's search space for SGD: step size log-uniform in [8/255, 10], momentum in [0, 0.9]; loss, optimizer and
# schedule fixed to the benchmark's DLR, SGD and cosine annealing to 0 (eta_min 0).
AP_SEARCH_SPACE = SearchSpace(alpha_init=(8 / 255, 10.0), momentum=(0.0, 0.9), losses=("dlr",), optimizers=("sgd",),
                              schedules=("cosine",), eps_starts=("unbounded",), alpha_final=0.0)


def ap_eps_grid() -> List[float]:
    """The AP benchmark's security-curve budgets: 1,000 evenly spaced eps in [0, 0.15] (the benchmark's plots)."""
    return torch.linspace(0.0, AP_CURVE_EPS_MAX, AP_CURVE_POINTS, dtype=torch.float64).tolist()


def ap_config(cfg, sources: Dict[str, str]) -> Tuple[Any, List[str]]:
    """`cfg` under the benchmark's AutoAttack protocol, and the deviations from it that the user asked for.

    Linf at eps 0.031 (the PGD-type step size keeps the configured step/eps ratio), the first 10,000 test points
    (a smaller --n-examples is honoured and recorded), every attack batch 500 points.
    """
    deviations = []
    if cfg.dataset not in AP_DATASETS:
        deviations.append(f"dataset {cfg.dataset}: the benchmark covers {' and '.join(AP_DATASETS)} only")
    n_examples = AP_AA_POINTS
    if cfg.n_examples is not None and cfg.n_examples < AP_AA_POINTS:
        n_examples = cfg.n_examples
        deviations.append(f"--n-examples {cfg.n_examples}: the protocol evaluates the first {AP_AA_POINTS} test "
                          "points")
    if cfg.eval_batch_size not in (None, AP_AA_BATCH):
        log.warning("--attack-preset ap evaluates in batches of %d (the benchmark's); --eval-batch-size %d ignored",
                    AP_AA_BATCH, cfg.eval_batch_size)
    ignored = [flag for flag, key in (("--epsilon", "epsilon"), ("--distance", "distance"), ("--fmn-steps", "fmn_steps"))
               if sources.get(key, "default") == "command line"]
    if ignored:
        log.warning("--attack-preset ap fixes the threat model and FMN's steps; %s ignored", ", ".join(ignored))
    ratio = cfg.step_size / cfg.epsilon if cfg.epsilon > 0 else 0.25
    changed = dataclasses.replace(cfg, epsilon=AP_AA_EPS, distance="l_inf", step_size=AP_AA_EPS * ratio,
                                  n_examples=n_examples, eval_batch_size=AP_AA_BATCH)
    for text in deviations:
        log.warning("--attack-preset ap: %s", text)
    return changed, deviations


def ap_attacks(text: str) -> List[str]:
    """`--attacks` under the preset: 'all' is the benchmark's pair (AutoAttack and FMN), a list is taken as given."""
    return list(AP_ATTACKS) if str(text).strip().lower() == "all" else parse_attacks(text)


def preset_attacks(text: str, preset: str) -> List[str]:
    """What test.py runs for `--attacks text` under `--attack-preset preset` (one-line UserError for a bad list)."""
    return ap_attacks(text) if preset == AP_PRESET else parse_attacks(text)


def _points(value: Sequence[int]) -> List[int]:
    return [int(value[0]), int(value[1])]


def protocol_record(suite: Dict[str, Any], *, seed: int, deviations: Sequence[str]) -> Dict[str, Any]:
    """Every setting of the protocol as it ran, the benchmark's numbers in its units, and the deviations.

    `suite` is trainers.evaluation.suite.run_suite's output under the preset (entries 'autoattack' and 'fmn'
    where they ran; their own parameters say what actually ran).
    """
    attacks = suite.get("attacks", {})
    aa, fmn = attacks.get("autoattack"), attacks.get("fmn")
    all_deviations = list(deviations) + list((fmn or {}).get("deviations", []))
    record: Dict[str, Any] = {
        "benchmark": BENCHMARK,
        "autoattack": {
            "implementation": "official AutoAttack 'standard' assembled from torchattacks 3.5.1 components "
                              "(trainers/evaluation/autoattack.py)",
            "version": "standard", "norm": "Linf", "eps": AP_AA_EPS, "points": [0, AP_AA_POINTS],
            "points_evaluated": suite.get("n"), "batch_size": AP_AA_BATCH,
            "seed": seed, "benchmark_seed": "none (time-based)",
            "counting": "clean errors count as not robust; per-point worst case over the four attacks",
            "ran": aa is not None,
        },
        "hofmn": {
            "norm": "Linf", "loss": "dlr", "optimizer": "sgd (sign of the gradient, heavy-ball momentum)",
            "scheduler": "cosine annealing of the step size (T_max = steps, eta_min 0)",
            "tuning": {"trials": AP_TUNE_TRIALS, "steps": AP_TUNE_STEPS, "points": _points(AP_TUNE_POINTS),
                       "search": "random (the benchmark: Bayesian optimisation with ax-platform)",
                       "objective": "median Linf distance, failures +inf",
                       "not_searched": "weight decay and dampening (0 here; the benchmark searches [0.01, 1] and "
                                       "[0, 0.2])"},
            "attack": {"steps": AP_STEPS, "points": _points(AP_EVAL_POINTS)},
            "threshold_eps": AP_EPS,
            "counting": "distance 0 for clean errors and for points FMN never broke (HO-FMN's best_adv starts at "
                        "the clean input); robust = distance > 8/255",
            "curve": {"eps_min": 0.0, "eps_max": AP_CURVE_EPS_MAX, "points": AP_CURVE_POINTS},
            "ran": fmn is not None,
        },
        "units": {"clean_accuracy": "percent (AutoAttack's 'initial accuracy' on the AutoAttack points)",
                  "robust_accuracy_aa": "percent", "robust_accuracy_hofmn": "fraction in [0, 1]"},
    }
    if fmn is not None:
        tuning = fmn.get("tuning") or {}
        record["hofmn"]["tuning"].update(trials=tuning.get("n_configs"), steps=tuning.get("steps"),
                                         points=tuning.get("points"), chosen=fmn.get("config"))
        record["hofmn"]["attack"].update(steps=fmn.get("steps"), points=fmn.get("points"))
    record["numbers"] = benchmark_numbers(suite)
    record["deviations"] = all_deviations
    return record


def benchmark_numbers(suite: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """Clean and AutoAttack robust accuracy in percent rounded as AutoAttack prints them (2 decimals), HO-FMN
    robust accuracy as the fraction the benchmark computes; None for an evaluation that did not run."""
    attacks = suite.get("attacks", {})
    aa, fmn = attacks.get("autoattack"), attacks.get("fmn")
    return {"clean_accuracy": round(float(suite["natural_acc"]), 2),
            "robust_accuracy_aa": None if aa is None else round(float(aa["robust_acc"]), 2),
            # 7 decimals: the exact fraction for the benchmark's 128 points (multiples of 1/128)
            "robust_accuracy_hofmn": None if fmn is None else round(float(fmn["robust_acc"]) / 100.0, 7)}
