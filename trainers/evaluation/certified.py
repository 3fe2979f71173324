"""Certified evaluations for test.py (`--attacks certify,ibp,sym,crown-ibp`): whole-set entries of the attack
registry.

    certify    randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): CERTIFY (N0 selection draws, N
               estimation draws, one-sided Clopper-Pearson bound at alpha, abstain below 1/2) and PREDICT (N draws,
               binomial test at alpha) of the smoothed classifier with noise std --noise-std, as Hydra's
               eval_smoothing.py (github.com/inspire-group/hydra). `robust_acc` is the certified
               accuracy at radius 0 (correct and not abstained); the entry also has `certified_accuracy` (a list of
               {radius, acc} over the L2 radius grid), `prediction_acc` (PREDICT), `average_certified_radius`,
               the abstention rates, the parameters and `per_point` (label, prediction, radius, correct,
               smoothed_prediction; prediction -1 = abstained).
    ibp        IBP-verified accuracy at the threat model's Linf eps (Hydra's evaluation of its verifiable models)
    sym        the same with symbolic interval analysis (ReluVal / Neurify; Hydra's evaluation of MixTrain models)
    crown-ibp  the same with CROWN-IBP bounds (Zhang et al. 2020), usually tighter on models trained with them

None is part of `--attacks all`: certify costs N0 + 2N forwards per point, and the bounds need an nn.Sequential
of Conv2d/Linear/ReLU/Flatten (any other model gives a one-line error). The bounds are sound, so a verified point
is robust to every attack of the same eps: verified accuracy never exceeds PGD's. All three bounds score the clean
pass's points, and `verified_comparison` puts them side by side in test.py's summary.
"""
import logging
import time
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from configs.errors import UserError
from trainers.attacks.threat import L2, LINF
from trainers.certify.bounds import CROWN_IBP, IBP, METHODS, SYMBOLIC, verified
from trainers.certify.smoothing import DEFAULT_RADII, Certificate, certification_summary, certify, predict
from trainers.evaluation.registry import ATTACKS, AttackSpec, EvalSettings
from trainers.evaluation.scoring import Batches, PassResult, result_entry, worst_case
from utils.progress import progress
from utils.seed import seed_everything

log = logging.getLogger(__name__)

CERTIFY = "certify"


def certify_settings(cfg) -> Dict[str, Any]:
    """EvalSettings' certification fields from a resolved Config, for test.py's
    `EvalSettings(..., **certify_settings(cfg))`. The noisy copies per forward are --eval-batch-size when given."""
    radii = cfg.certify_radii
    if radii is not None and (not radii or any(r < 0 for r in radii)):
        raise UserError(f"--certify-radii must be radii >= 0, got {radii}")
    fields = dict(noise_std=cfg.noise_std, certify_n0=cfg.certify_n0, certify_n=cfg.certify_n,
                  certify_alpha=cfg.certify_alpha, certify_radii=None if radii is None else tuple(sorted(radii)))
    if cfg.eval_batch_size:
        fields["certify_batch_size"] = cfg.eval_batch_size
    return fields


def _certify_params(settings: EvalSettings) -> Dict[str, Any]:
    return dict(sigma=settings.noise_std, n0=settings.certify_n0, n=settings.certify_n, alpha=settings.certify_alpha,
                batch_size=settings.certify_batch_size, seed=settings.seed,
                radii=list(settings.certify_radii or DEFAULT_RADII))


def certify_entry(model: nn.Module, make_batches: Callable[[], Batches], settings: EvalSettings,
                  clean: PassResult) -> Dict[str, Any]:
    """test.py's `certify`: CERTIFY and PREDICT of the smoothed model on every point, as one result entry."""
    seed_everything(settings.seed)
    started = time.time()
    common = dict(sigma=settings.noise_std, n=settings.certify_n, alpha=settings.certify_alpha,
                  batch_size=settings.certify_batch_size, num_classes=settings.num_classes)
    labels, predictions, radii, smoothed = [], [], [], []
    desc = f"{CERTIFY} sigma={settings.noise_std:g}"
    for x, y in progress(make_batches(), desc=desc, enabled=settings.show_progress):
        certificate = certify(model, x, n0=settings.certify_n0, **common)
        labels.append(y.cpu())
        predictions.append(certificate.prediction)
        radii.append(certificate.radius)
        smoothed.append(predict(model, x, **common))
    if not labels:
        raise UserError("no test examples to certify")
    labels = torch.cat(labels)
    certificate = Certificate(prediction=torch.cat(predictions), radius=torch.cat(radii))
    smoothed = torch.cat(smoothed)
    grid = settings.certify_radii or DEFAULT_RADII
    summary = certification_summary(labels, certificate, smoothed, grid)
    correct = certificate.prediction == labels
    per_point = {"label": labels.tolist(), "prediction": certificate.prediction.tolist(),
                 "radius": [round(r, 6) for r in certificate.radius.tolist()], "correct": correct.tolist(),
                 "smoothed_prediction": smoothed.tolist()}
    log.info("%s: certified accuracy %s; PREDICT %.2f%%, average certified radius %.4f", CERTIFY,
             ", ".join(f"{p['acc']:.2f}% at r={p['radius']:g}" for p in summary["certified_accuracy"]),
             summary["prediction_acc"], summary["average_certified_radius"])
    # robust_acc (radius 0) is scored like any attack: the certificate's prediction, abstentions wrong.
    radius_zero = settings.with_threat(eps=0.0, norm=L2)
    return result_entry(radius_zero, labels, certificate.prediction, time.time() - started, _certify_params(settings),
                        **summary, per_point=per_point)


def _verified_entry(method: str):
    def run(model: nn.Module, make_batches: Callable[[], Batches], settings: EvalSettings,
            clean: PassResult) -> Dict[str, Any]:
        """Verified accuracy: a point counts when it is classified correctly and every margin's lower bound over
        the eps-ball is positive."""
        threat = settings.threat
        if threat.norm != LINF:
            raise UserError(f"--attacks {method} verifies Linf balls; use --distance l_inf")
        started = time.time()
        flags, labels = [], []
        for x, y in progress(make_batches(), desc=f"{method} eps={threat.eps:g}", enabled=settings.show_progress):
            flags.append(verified(model, x, y, eps=threat.eps, method=method, beta=1.0, clip_min=threat.clip_min,
                                  clip_max=threat.clip_max).cpu())
            labels.append(y.cpu())
        labels, flags = torch.cat(labels), torch.cat(flags)  # the clean pass's points, in its order
        bound_prediction = torch.where(flags, labels, torch.full_like(labels, -1))
        return result_entry(settings, clean.labels, worst_case(clean, bound_prediction), time.time() - started,
                            {"bound": method})
    return run


def verified_comparison(attacks: Dict[str, Dict[str, Any]]) -> Optional[str]:
    """One line with the verified accuracies of the bounds that ran (IBP, symbolic, CROWN-IBP: all on the clean
    pass's points), or None when fewer than two did."""
    ran = [method for method in METHODS if method in attacks]
    if len(ran) < 2:
        return None
    return f"verified at eps {attacks[ran[0]]['eps']:g}, same points: " + \
        " | ".join(f"{method} {attacks[method]['robust_acc']:.2f}%" for method in ran)


ATTACKS.add(CERTIFY, AttackSpec(
    CERTIFY, "randomized smoothing: Cohen et al.'s CERTIFY and PREDICT (--noise-std, --certify-n0/-n/-alpha); "
    "robust = certified accuracy at radius 0", _certify_params, run=certify_entry, in_all=False))
ATTACKS.add(IBP, AttackSpec(
    IBP, "IBP-verified accuracy at eps (nn.Sequential conv/linear/ReLU models such as cifar_model)",
    lambda s: {"bound": IBP}, run=_verified_entry(IBP), in_all=False))
ATTACKS.add(SYMBOLIC, AttackSpec(
    SYMBOLIC, "symbolic-interval-verified accuracy at eps (ReluVal/Neurify, as MixTrain; nn.Sequential conv/linear/"
    "ReLU models such as cifar_model)", lambda s: {"bound": SYMBOLIC}, run=_verified_entry(SYMBOLIC), in_all=False))
ATTACKS.add(CROWN_IBP, AttackSpec(
    CROWN_IBP, "CROWN-IBP-verified accuracy at eps (nn.Sequential conv/linear/ReLU models such as cifar_model)",
    lambda s: {"bound": CROWN_IBP}, run=_verified_entry(CROWN_IBP), in_all=False))
