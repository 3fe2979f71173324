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
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from configs.errors import UserError
from trainers.attacks.threat import L2, LINF
from trainers.certify.bounds import CROWN_IBP, IBP, METHODS, SYMBOLIC, bound_steps, verified
from trainers.certify.smoothing import (DEFAULT_RADII, Certificate, certification_summary, certify,
                                       clopper_pearson_lower, predict)
from trainers.evaluation.registry import ATTACKS, AttackOptions, AttackSpec, EvalContext, EvalSettings
from trainers.evaluation.scoring import Batches, PassResult, result_entry, worst_case
from utils.progress import progress
from utils.seed import seed_everything

log = logging.getLogger(__name__)

CERTIFY = "certify"


@dataclass(frozen=True)
class CertifyOptions(AttackOptions):
    noise_std: float = 0.25         # sigma of the smoothed classifier, [0, 1] input units
    n0: int = 100                   # noise draws per point that select the top class
    n: int = 10_000                 # noise draws per point that bound its probability (and PREDICT's)
    alpha: float = 0.001            # failure probability of each certificate
    batch_size: int = 1000          # noisy copies per forward
    radii: Optional[Tuple[float, ...]] = None  # certified-accuracy radii (None: Cohen et al.'s grid)

    @classmethod
    def from_config(cls, cfg, context: EvalContext) -> "CertifyOptions":
        """--noise-std, --certify-n0/-n/-alpha/-radii; the noisy copies per forward are --eval-batch-size when
        given."""
        radii = cfg.certify_radii
        return cls(noise_std=cfg.noise_std, n0=cfg.certify_n0, n=cfg.certify_n, alpha=cfg.certify_alpha,
                   batch_size=cfg.eval_batch_size or cls.batch_size,
                   radii=None if radii is None else tuple(sorted(radii)))

    @property
    def grid(self) -> Tuple[float, ...]:
        return self.radii or DEFAULT_RADII


def check_certify(model: nn.Module, settings: EvalSettings, options: CertifyOptions, points) -> None:
    """Radii that exist, and enough draws that a point can be certified at all: N successes out of N give the
    lower bound alpha^(1/N), which must reach 1/2."""
    if options.radii is not None and (not options.radii or any(r < 0 for r in options.radii)):
        raise UserError(f"--certify-radii must be radii >= 0, got {list(options.radii)}")
    best = float(clopper_pearson_lower(np.array([options.n]), options.n, options.alpha)[0])
    if best < 0.5:
        needed = math.ceil(math.log2(1.0 / options.alpha))
        raise UserError(f"--certify-n {options.n} cannot certify any point at --certify-alpha {options.alpha:g} (even "
                        f"{options.n} of {options.n} draws bound the top class at {best:.3f} < 0.5); use at least "
                        f"{needed} draws")


def _certify_params(settings: EvalSettings, options: CertifyOptions) -> Dict[str, Any]:
    return dict(sigma=options.noise_std, n0=options.n0, n=options.n, alpha=options.alpha,
                batch_size=options.batch_size, seed=settings.seed, radii=list(options.grid))


def certify_entry(model: nn.Module, make_batches: Callable[[], Batches], settings: EvalSettings,
                  options: CertifyOptions, clean: PassResult) -> Dict[str, Any]:
    """test.py's `certify`: CERTIFY and PREDICT of the smoothed model on every point, as one result entry."""
    seed_everything(settings.seed)
    started = time.time()
    common = dict(sigma=options.noise_std, n=options.n, alpha=options.alpha, batch_size=options.batch_size,
                  num_classes=settings.num_classes)
    labels, predictions, radii, smoothed = [], [], [], []
    desc = f"{CERTIFY} sigma={options.noise_std:g}"
    for x, y in progress(make_batches(), desc=desc, enabled=settings.show_progress):
        certificate = certify(model, x, n0=options.n0, **common)
        labels.append(y.cpu())
        predictions.append(certificate.prediction)
        radii.append(certificate.radius)
        smoothed.append(predict(model, x, **common))
    if not labels:
        raise UserError("no test examples to certify")
    labels = torch.cat(labels)
    certificate = Certificate(prediction=torch.cat(predictions), radius=torch.cat(radii))
    smoothed = torch.cat(smoothed)
    summary = certification_summary(labels, certificate, smoothed, options.grid)
    correct = certificate.prediction == labels
    per_point = {"label": labels.tolist(), "prediction": certificate.prediction.tolist(),
                 "radius": [round(r, 6) for r in certificate.radius.tolist()], "correct": correct.tolist(),
                 "smoothed_prediction": smoothed.tolist()}
    log.info("%s: certified accuracy %s; PREDICT %.2f%%, average certified radius %.4f", CERTIFY,
             ", ".join(f"{p['acc']:.2f}% at r={p['radius']:g}" for p in summary["certified_accuracy"]),
             summary["prediction_acc"], summary["average_certified_radius"])
    # robust_acc (radius 0) is scored like any attack: the certificate's prediction, abstentions wrong.
    radius_zero = settings.with_threat(eps=0.0, norm=L2)
    return result_entry(radius_zero, labels, certificate.prediction, time.time() - started,
                        _certify_params(settings, options), **summary, per_point=per_point)


def check_bounds(model: nn.Module, settings: EvalSettings, options, points) -> None:
    """The bounds verify Linf balls, and only for models they can walk (trainers.certify.bounds.bound_steps)."""
    if settings.norm != LINF:
        raise UserError("the bounds verify Linf balls; use --distance l_inf")
    bound_steps(model)


def _verified_entry(method: str):
    def run(model: nn.Module, make_batches: Callable[[], Batches], settings: EvalSettings, options,
            clean: PassResult) -> Dict[str, Any]:
        """Verified accuracy: a point counts when it is classified correctly and every margin's lower bound over
        the eps-ball is positive."""
        threat = settings.threat
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
    "robust = certified accuracy at radius 0", run=certify_entry, options=CertifyOptions, check=check_certify,
    in_all=False))
ATTACKS.add(IBP, AttackSpec(
    IBP, "IBP-verified accuracy at eps (nn.Sequential conv/linear/ReLU models such as cifar_model)",
    run=_verified_entry(IBP), check=check_bounds, in_all=False))
ATTACKS.add(SYMBOLIC, AttackSpec(
    SYMBOLIC, "symbolic-interval-verified accuracy at eps (ReluVal/Neurify, as MixTrain; nn.Sequential conv/linear/"
    "ReLU models such as cifar_model)", run=_verified_entry(SYMBOLIC), check=check_bounds, in_all=False))
ATTACKS.add(CROWN_IBP, AttackSpec(
    CROWN_IBP, "CROWN-IBP-verified accuracy at eps (nn.Sequential conv/linear/ReLU models such as cifar_model)",
    run=_verified_entry(CROWN_IBP), check=check_bounds, in_all=False))
