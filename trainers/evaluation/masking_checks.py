"""Gradient-masking checks: official AutoAttack's (github.com/fra31/auto-attack, checks.py) and one from minimum-norm distances.

A gradient-based evaluation can overstate robustness when the model's gradients are useless (gradient masking,
Athalye et al. 2018). test.py runs these checks after its attacks; each flagged check is logged as a warning and
the result JSON holds all of them under `gradient_masking` (`{"flagged": [names], "checks": {name: check}}`,
a check being `{"flagged": bool, "detail": str, ...its numbers}`). None stops the evaluation.

    randomised_output     5 forward passes of the first batch disagree (predictions, or L2-normalised logits by
                          more than 1e-4): the model is stochastic, so deterministic attacks are not enough
    probability_output    outputs in [0, 1] summing to 1: softmax probabilities instead of logits
    zero_gradients        points of the first batch whose input gradient of the DLR loss (logit margin with
                          fewer than 3 classes) is exactly zero: gradient attacks cannot move them
    square_after_white_box  Square (black-box) lowered AutoAttack's robust accuracy by more than 0.2 points after
                          APGD-CE, APGD-T and FAB-T: the white-box attacks missed what a gradient-free one found
    minimum_norm_below_fixed_budget  FMN's robust accuracy at an attack's eps is more than 5 points below the
                          lowest robust accuracy of the fixed-budget attacks (PGD, CW, APGD, AutoAttack): a
                          minimum-norm attack on logit differences found adversarial points they missed. When
                          the two ran on different points (the AP preset: FMN on 128, AutoAttack on the first
                          10,000; --autoattack-points), the threshold is at least MIN_NORM_GAP_SE binomial
                          standard errors of the smaller point count, so sampling alone rarely flags it

The first three are official AutoAttack's `check_randomized`, `check_range_output` and `check_zero_gradients`,
the fourth its `check_square_sr`; the last is ours (FMN distances far below PGD's).
"""
import logging
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from trainers.attacks.fmn import attack_objective
from trainers.evaluation.scoring import stderr
from utils.modes import eval_mode

log = logging.getLogger(__name__)

RANDOMISED_PASSES = 5          # official AutoAttack's forward passes of check_randomized
RANDOMISED_TOLERANCE = 1e-4    # largest change of the L2-normalised logits
SQUARE_GAP_PP = 0.2            # official check_square_sr, percentage points
MIN_NORM_GAP_PP = 5.0          # FMN below the best fixed-budget attack by more than this (percentage points)
MIN_NORM_GAP_SE = 2.0          # ... and by more than this many standard errors when they ran on different points
FIXED_BUDGET_ATTACKS = ("pgd", "pgd10", "pgd20", "pgd50", "cw", "apgd", "autoattack")
SQUARE_COMPONENT = "square"
Check = Dict[str, Any]


def _check(flagged: bool, detail: str, **numbers: Any) -> Check:
    return dict(flagged=bool(flagged), detail=detail, **numbers)


def randomised_output(model: nn.Module, x: torch.Tensor) -> Check:
    with torch.no_grad():
        outputs = [model(x) for _ in range(RANDOMISED_PASSES)]
    normalised = [o / o.norm(dim=1, keepdim=True).clamp_min(1e-12) for o in outputs]
    change = max(float((n - normalised[0]).abs().max()) for n in normalised)
    predictions_change = any(not torch.equal(o.argmax(1), outputs[0].argmax(1)) for o in outputs)
    flagged = predictions_change or change > RANDOMISED_TOLERANCE
    detail = ("the model's output changes between forward passes on the same input: it looks randomised; "
              "deterministic attacks (AutoAttack's standard version) then overstate robustness" if flagged
              else "deterministic")
    return _check(flagged, detail, max_normalised_change=change, passes=RANDOMISED_PASSES)


def probability_output(logits: torch.Tensor) -> Check:
    flagged = (float(logits.min()) >= 0 and float(logits.max()) <= 1
               and torch.allclose(logits.sum(dim=1), torch.ones_like(logits[:, 0]), atol=1e-5))
    detail = ("the outputs look like probabilities (in [0, 1], summing to 1); the attacks expect logits" if flagged
              else "logits")
    return _check(flagged, detail)


def zero_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Check:
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    loss = "dlr" if logits.shape[1] >= 3 else "ld"
    (grad,) = torch.autograd.grad(attack_objective(logits, y, loss, targeted=False).sum(), [x])
    zero = int((grad.flatten(1).abs().amax(dim=1) == 0).sum())
    detail = (f"{zero} of {len(y)} points have an all-zero input gradient of the {loss} loss: gradient-based "
              "attacks cannot move them (gradient masking?)" if zero else "no zero gradients")
    return _check(zero > 0, detail, points=len(y), zero_gradient_points=zero, loss=loss)


def square_after_white_box(attacks: Dict[str, Dict[str, Any]]) -> Optional[Check]:
    """None unless AutoAttack ran Square after at least one other component."""
    components = (attacks.get("autoattack") or {}).get("per_component") or {}
    names = list(components)
    if SQUARE_COMPONENT not in names or names.index(SQUARE_COMPONENT) == 0:
        return None
    before = components[names[names.index(SQUARE_COMPONENT) - 1]]["robust_acc"]
    after = components[SQUARE_COMPONENT]["robust_acc"]
    flagged = before - after > SQUARE_GAP_PP
    detail = (f"Square (black-box) lowered robust accuracy by {before - after:.2f} points after the white-box "
              f"attacks ({before:.2f}% -> {after:.2f}%): the gradients may be unreliable" if flagged
              else f"Square lowered robust accuracy by {before - after:.2f} points (at most {SQUARE_GAP_PP})")
    return _check(flagged, detail, before=before, after=after)


def _curve_at(curve: Iterable[Dict[str, float]], eps: float) -> Optional[Tuple[float, float]]:
    """(grid eps, robust accuracy) at the largest grid eps <= `eps`: an upper bound of the curve at `eps`."""
    below = [p for p in curve if p["eps"] <= eps * (1 + 1e-9)]
    return (below[-1]["eps"], below[-1]["robust_acc"]) if below else None


def _positions(name: str, entry: Dict[str, Any], n: Optional[int]) -> Optional[Tuple[int, int]]:
    """The evaluated points [start, end) an entry covers: FMN's `points`, AutoAttack's first `points`, else all n
    (None: not known)."""
    points = entry.get("points")
    if isinstance(points, (list, tuple)):
        return int(points[0]), int(points[1])
    if name == "autoattack" and points is not None:
        return 0, int(points)
    return None if n is None else (0, n)


def _gap_threshold(fmn: Dict[str, Any], name: str, entry: Dict[str, Any], n: Optional[int]) -> Tuple[float, int]:
    """The gap (percentage points) that flags, and the smaller point count when the two covered different points
    (0 when they covered the same ones, or it is not known): MIN_NORM_GAP_PP, or MIN_NORM_GAP_SE standard errors of
    the fixed-budget attack's accuracy on the smaller count if that is larger."""
    mine, theirs = _positions("fmn", fmn, n), _positions(name, entry, n)
    if mine is None or theirs is None or mine == theirs:  # the same points, or not known to differ
        return MIN_NORM_GAP_PP, 0
    smaller = max(min(mine[1] - mine[0], theirs[1] - theirs[0]), 1)
    return max(MIN_NORM_GAP_PP, MIN_NORM_GAP_SE * stderr(entry["robust_acc"], smaller)), smaller


def minimum_norm_below_fixed_budget(attacks: Dict[str, Dict[str, Any]], n: Optional[int] = None) -> Optional[Check]:
    """None unless FMN and a fixed-budget attack of the same norm both ran. `n`: the points the suite evaluated."""
    fmn = attacks.get("fmn")
    others = {name: e for name, e in attacks.items() if name in FIXED_BUDGET_ATTACKS and fmn is not None
              and e.get("norm") == fmn.get("norm")}
    if not others:
        return None
    name, entry = min(others.items(), key=lambda item: item[1]["robust_acc"])
    point = _curve_at(fmn["curve"], entry["eps"])
    if point is None:
        return None
    grid_eps, fmn_acc = point
    gap = entry["robust_acc"] - fmn_acc
    threshold, smaller = _gap_threshold(fmn, name, entry, n)
    flagged = gap > threshold
    failures = fmn.get("failures", 0) if fmn.get("counting") == "failures_zero" else 0
    detail = (f"FMN's robust accuracy at eps {grid_eps:g} is {fmn_acc:.2f}%, {gap:.2f} points below {name}'s "
              f"{entry['robust_acc']:.2f}% at eps {entry['eps']:g}: the fixed-budget attacks miss adversarial points "
              "(gradient masking?)" if flagged else
              f"FMN {fmn_acc:.2f}% vs {name} {entry['robust_acc']:.2f}% at eps {entry['eps']:g}")
    if flagged and failures:
        detail += f"; {failures} FMN failures count as broken under this preset"
    if smaller:
        detail += f" (on different points: threshold {threshold:.2f} points, {MIN_NORM_GAP_SE:g} standard errors " \
                  f"of {smaller})"
    return _check(flagged, detail, fmn_robust_acc=fmn_acc, fmn_eps=grid_eps, attack=name,
                  attack_robust_acc=entry["robust_acc"], gap=gap, threshold=threshold, same_points=not smaller)


def gradient_masking_report(model: nn.Module, make_batches: Callable[[], Iterable[Tuple[torch.Tensor, torch.Tensor]]],
                            attacks: Dict[str, Dict[str, Any]], n: Optional[int] = None) -> Dict[str, Any]:
    """Every check that applies (the model checks on the first batch, the others from the attacks' entries of the
    suite's `n` points); flagged ones are logged as warnings."""
    checks: Dict[str, Check] = {}
    first = next(iter(make_batches()), None)
    if first is not None:
        x, y = first
        with eval_mode(model):
            checks["randomised_output"] = randomised_output(model, x)
            with torch.no_grad():
                checks["probability_output"] = probability_output(model(x))
            checks["zero_gradients"] = zero_gradients(model, x, y)
    for name, check in (("square_after_white_box", square_after_white_box(attacks)),
                        ("minimum_norm_below_fixed_budget", minimum_norm_below_fixed_budget(attacks, n))):
        if check is not None:
            checks[name] = check
    flagged = [name for name, check in checks.items() if check["flagged"]]
    for name in flagged:
        log.warning("gradient-masking check %s: %s", name, checks[name]["detail"])
    return {"flagged": flagged, "checks": checks}
