"""The attacks test.py runs, by name, and the evaluation of a set of them over a test set.

Names (DESIGN.md §5; harp-spec §7 for what the original ran):

    natural      clean accuracy
    fgsm         one step of size eps from the clean input (Linf: sign of the gradient; L2: normalised gradient)
    pgd10/20/50  PGD-k on cross-entropy, random start, step size from the config
    cw           PGD on the CW margin loss (kappa 50), 20 steps, random start, same step size
    apgd         torchattacks APGD-CE, 50 steps, 5 restarts (as the original test.py)
    autoattack   AutoAttack over the whole set (trainers/autoattack.py), preset 'standard' or 'original'

How a point is scored. A point counts as robust only if the model classifies it correctly both on the clean
input and on the attack's output: the clean input lies inside every eps-ball, so an attack that returns a
point the model gets right while the clean one is wrong has simply not found the worst case. Robust accuracy
therefore never exceeds natural accuracy (official AutoAttack counts clean errors the same way). The
prediction used for balanced accuracy is the worst one found: the clean prediction if it is already wrong,
else the prediction on the adversarial input.

Every attack's output is pulled back into the eps-ball and [clip_min, clip_max] before it is scored, and the
largest perturbation seen is recorded. The model is in eval mode during every attack and each module's own
mode is restored afterwards. `torch.manual_seed(seed)` (via utils.seed) runs before each attack, so on the
CPU two runs with the same seed give identical numbers.
"""
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from configs.errors import UserError
from configs.schema import ATTACK_NAMES
from pruning.wrap import masked_layers, prunable_layers, sparsity_report
from trainers.attacks import LINF, ThreatModel, eval_mode, perturbation_norms, pgd, project_to_threat
from trainers.autoattack import build_components, run_autoattack
from utils.progress import progress
from utils.seed import seed_everything

log = logging.getLogger(__name__)

Batches = Iterable[Tuple[torch.Tensor, torch.Tensor]]
CW_KAPPA = 50.0
CW_STEPS = 20
APGD_STEPS, APGD_RESTARTS = 50, 5
_EPS_SLACK = 1e-5


@dataclass(frozen=True)
class EvalSettings:
    """Threat model and run settings shared by every attack of one evaluation."""
    eps: float
    norm: str = LINF                # 'linf' or 'l2'
    step_size: float = 2 / 255      # PGD-k and CW step size
    clip_min: float = 0.0
    clip_max: float = 1.0
    seed: int = 0
    num_classes: int = 10
    preset: str = "standard"        # AutoAttack preset
    aa_batch_size: int = 1000       # AutoAttack survivors per attacked batch
    balanced: bool = False          # also report balanced accuracy (SVHN, as the paper)
    show_progress: bool = True

    def threat(self, steps: int, step_size: Optional[float] = None, random_start: bool = True,
               eps: Optional[float] = None) -> ThreatModel:
        return ThreatModel(eps=self.eps if eps is None else eps,
                           step_size=self.step_size if step_size is None else step_size, steps=steps, norm=self.norm,
                           clip_min=self.clip_min, clip_max=self.clip_max, random_start=random_start)


@dataclass(frozen=True)
class AttackSpec:
    """A per-batch attack: `make(model, settings)` returns `attack(x, y) -> x_adv`; `params` describes it."""
    name: str
    make: Callable[[nn.Module, EvalSettings], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    params: Callable[[EvalSettings], Dict[str, Any]]


def _pgd_spec(name: str, steps: int) -> AttackSpec:
    return AttackSpec(
        name,
        lambda model, s: (lambda x, y: pgd(model, x, y, s.threat(steps))),
        lambda s: dict(steps=steps, step_size=s.step_size, random_start=True, restarts=1, loss="ce"))


def _fgsm(model, s: EvalSettings):
    # Linf: x + eps * sign(grad), exactly trainers.attacks.fgsm; L2: x + eps * grad / ||grad||.
    threat = s.threat(1, step_size=s.eps, random_start=False)
    return lambda x, y: pgd(model, x, y, threat)


def _cw(model, s: EvalSettings):
    threat = s.threat(CW_STEPS)
    return lambda x, y: pgd(model, x, y, threat, loss="cw")


def _apgd(model, s: EvalSettings):
    import torchattacks

    attack = torchattacks.APGD(model, norm="Linf" if s.norm == LINF else "L2", eps=s.eps, steps=APGD_STEPS,
                               n_restarts=APGD_RESTARTS, seed=s.seed, loss="ce", eot_iter=1, rho=0.75)
    return lambda x, y: attack(x, y)


BATCH_ATTACKS: Dict[str, AttackSpec] = {
    "fgsm": AttackSpec("fgsm", _fgsm, lambda s: dict(steps=1, step_size=s.eps, random_start=False, restarts=1,
                                                     loss="ce")),
    "pgd10": _pgd_spec("pgd10", 10),
    "pgd20": _pgd_spec("pgd20", 20),
    "pgd50": _pgd_spec("pgd50", 50),
    "cw": AttackSpec("cw", _cw, lambda s: dict(steps=CW_STEPS, step_size=s.step_size, random_start=True, restarts=1,
                                               loss="cw-margin", kappa=CW_KAPPA)),
    "apgd": AttackSpec("apgd", _apgd, lambda s: dict(steps=APGD_STEPS, restarts=APGD_RESTARTS, loss="ce", rho=0.75,
                                                     implementation="torchattacks.APGD", seed=s.seed)),
}


def parse_attacks(text: str) -> List[str]:
    """'all' or a comma-separated list of names -> the names in canonical order (natural always first)."""
    names = [t.strip().lower() for t in str(text).replace(" ", ",").split(",") if t.strip()]
    if not names:
        raise UserError(f"--attacks is empty; choose from: all, {', '.join(ATTACK_NAMES)}")
    if "all" in names:
        return list(ATTACK_NAMES)
    unknown = [n for n in names if n not in ATTACK_NAMES]
    if unknown:
        raise UserError(f"unknown attack {unknown[0]!r} in --attacks; choose from: all, {', '.join(ATTACK_NAMES)}")
    return [n for n in ATTACK_NAMES if n in names]


# ----------------------------------------------------------------------------------------------- scoring
def _accuracy(correct: torch.Tensor) -> float:
    return 100.0 * float(correct.sum()) / max(correct.numel(), 1)


def _stderr(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy in percent."""
    p = acc / 100.0
    return 100.0 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def balanced_accuracy(labels: torch.Tensor, predictions: torch.Tensor) -> float:
    """sklearn's balanced_accuracy_score x 100 (the mean recall over the classes present in `labels`)."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected on small subsets
        warnings.simplefilter("ignore", UserWarning)
        return 100.0 * float(balanced_accuracy_score(labels.numpy(), predictions.numpy()))


@dataclass
class CleanPass:
    labels: torch.Tensor        # int64 [n], CPU
    predictions: torch.Tensor   # int64 [n], CPU

    @property
    def correct(self) -> torch.Tensor:
        return self.predictions == self.labels


def clean_pass(model: nn.Module, make_batches: Callable[[], Batches], num_batches: Optional[int] = None,
               show_progress: bool = True) -> CleanPass:
    labels, preds = [], []
    with eval_mode(model), torch.no_grad():
        for x, y in progress(make_batches(), total=num_batches, desc="natural", enabled=show_progress):
            preds.append(model(x).argmax(dim=1).cpu())
            labels.append(y.cpu())
    if not labels:
        raise UserError("no test examples to evaluate")
    return CleanPass(torch.cat(labels), torch.cat(preds))


def run_batch_attack(model: nn.Module, spec: AttackSpec, make_batches: Callable[[], Batches], settings: EvalSettings,
                     clean: CleanPass, num_batches: Optional[int] = None) -> Dict[str, Any]:
    """One per-batch attack over the set; returns its result entry (robust_acc, parameters, timing)."""
    seed_everything(settings.seed)
    started = time.time()
    adv_preds, max_norm, max_raw = [], 0.0, 0.0
    with eval_mode(model):
        attack = spec.make(model, settings)
        for x, y in progress(make_batches(), total=num_batches, desc=f"{spec.name} eps={settings.eps:g}",
                             enabled=settings.show_progress):
            x_raw = attack(x, y).detach()
            max_raw = max(max_raw, float(perturbation_norms(x_raw, x, settings.norm).max()))
            x_adv = project_to_threat(x_raw, x, settings.eps, settings.norm, settings.clip_min, settings.clip_max)
            max_norm = max(max_norm, float(perturbation_norms(x_adv, x, settings.norm).max()))
            with torch.no_grad():
                adv_preds.append(model(x_adv).argmax(dim=1).cpu())
    if max_raw > settings.eps * (1 + _EPS_SLACK) + _EPS_SLACK:
        log.warning("%s returned a perturbation of norm %.6g > eps %.6g; projected back before scoring", spec.name,
                    max_raw, settings.eps)
    adv_pred = torch.cat(adv_preds)
    worst = torch.where(clean.correct, adv_pred, clean.predictions)
    return _entry(settings, clean.labels, worst, time.time() - started, spec.params(settings),
                  max_perturbation=max_norm)


def _entry(settings: EvalSettings, labels: torch.Tensor, worst_pred: torch.Tensor, seconds: float,
           params: Dict[str, Any], **extra) -> Dict[str, Any]:
    acc = _accuracy(worst_pred == labels)
    out: Dict[str, Any] = {"robust_acc": acc, "stderr": _stderr(acc, labels.numel()), "eps": settings.eps,
                           "norm": settings.norm}
    if settings.balanced:
        out["balanced_acc"] = balanced_accuracy(labels, worst_pred)
    out.update(params)
    out.update(extra)
    out["seconds"] = round(seconds, 3)
    return out


def run_autoattack_entry(model: nn.Module, make_batches: Callable[[], Batches], settings: EvalSettings,
                         clean: CleanPass) -> Dict[str, Any]:
    components = build_components(model, settings.preset, norm=settings.norm, eps=settings.eps,
                                  num_classes=settings.num_classes, seed=settings.seed)
    result = run_autoattack(model, make_batches, components, eps=settings.eps, norm=settings.norm,
                            clip_min=settings.clip_min, clip_max=settings.clip_max,
                            batch_size=settings.aa_batch_size, seed=settings.seed,
                            show_progress=settings.show_progress)
    if not torch.equal(result.clean_correct, clean.correct):
        log.warning("AutoAttack's clean pass disagrees with the natural pass on %d points (non-deterministic model?)",
                    int((result.clean_correct != clean.correct).sum()))
    per_component = {}
    for name, comp in result.per_component.items():
        per_component[name] = dict(comp)
        per_component[name]["stderr"] = _stderr(comp["robust_acc"], result.n)
    params = {"preset": settings.preset, "version": "standard", "batch_size": settings.aa_batch_size,
              "seed": settings.seed, "components": list(result.per_component),
              "per_component": per_component}
    return _entry(settings, clean.labels, result.predictions, result.seconds, params,
                  max_perturbation=result.max_perturbation, clean_acc=result.clean_acc)


def run_suite(model: nn.Module, make_batches: Callable[[], Batches], attacks: Sequence[str], settings: EvalSettings,
              num_batches: Optional[int] = None, epsilons: Sequence[float] = (),
              curve_steps: int = 10) -> Dict[str, Any]:
    """Natural accuracy plus each attack in `attacks`; with `epsilons`, a PGD security curve.

    Returns {'n', 'natural_acc', 'natural_stderr', ['natural_balanced_acc'], 'attacks': {name: entry},
    ['security_curve']}. 'natural' is not an entry of 'attacks' (it has no eps); `natural_acc` is always there.
    """
    started = time.time()
    seed_everything(settings.seed)
    t0 = time.time()
    clean = clean_pass(model, make_batches, num_batches, settings.show_progress)
    n = clean.labels.numel()
    out: Dict[str, Any] = {"n": n, "natural_acc": _accuracy(clean.correct)}
    out["natural_stderr"] = _stderr(out["natural_acc"], n)
    if settings.balanced:
        out["natural_balanced_acc"] = balanced_accuracy(clean.labels, clean.predictions)
    out["natural_seconds"] = round(time.time() - t0, 3)
    log.info("natural accuracy %.2f%% on %d examples", out["natural_acc"], n)
    results: Dict[str, Any] = {}
    for name in attacks:
        if name == "natural":
            continue
        if name == "autoattack":
            results[name] = run_autoattack_entry(model, make_batches, settings, clean)
        elif name in BATCH_ATTACKS:
            results[name] = run_batch_attack(model, BATCH_ATTACKS[name], make_batches, settings, clean, num_batches)
        else:
            raise UserError(f"unknown attack {name!r}; choose from: {', '.join(ATTACK_NAMES)}")
        log.info("%s: robust accuracy %.2f%% (%.1fs)", name, results[name]["robust_acc"], results[name]["seconds"])
    out["attacks"] = results
    if epsilons:
        out["security_curve"] = security_curve(model, make_batches, settings, clean, epsilons, curve_steps,
                                               num_batches)
    out["seconds"] = round(time.time() - started, 3)
    return out


def security_curve(model: nn.Module, make_batches: Callable[[], Batches], settings: EvalSettings, clean: CleanPass,
                   epsilons: Sequence[float], steps: int = 10,
                   num_batches: Optional[int] = None) -> List[Dict[str, Any]]:
    """PGD-`steps` robust accuracy at each eps; the step size keeps the configured step_size/eps ratio
    (eps/4 for the presets), so every budget gets an equally aggressive attack."""
    ratio = settings.step_size / settings.eps if settings.eps > 0 else 0.25
    curve = []
    spec = _pgd_spec(f"pgd{steps}", steps)
    for eps in epsilons:
        local = replace(settings, eps=float(eps), step_size=float(eps) * ratio)
        if eps == 0:
            entry = {"robust_acc": _accuracy(clean.correct), "seconds": 0.0}
        else:
            entry = run_batch_attack(model, spec, make_batches, local, clean, num_batches)
        curve.append({"eps": float(eps), "robust_acc": entry["robust_acc"],
                      "stderr": _stderr(entry["robust_acc"], clean.labels.numel()), "steps": steps,
                      "step_size": float(eps) * ratio, "norm": settings.norm, "seconds": entry["seconds"]})
        log.info("security curve: eps %g -> %.2f%%", eps, entry["robust_acc"])
    return curve


# ----------------------------------------------------------------------------------------------- sparsity
def model_sparsity(model: nn.Module) -> Dict[str, Any]:
    """Exact integer kept/total counts of the prunable (conv and linear) weights.

    A masked model reports its masks (pruning.wrap.sparsity_report: kept, total, keep and the soft rate k_l per
    layer). A plain model, e.g. a dense export with the masks folded in, reports its non-zero weights; then
    'rate' equals 'keep'. 'sparsity' = 1 - global_keep.
    """
    if masked_layers(model):
        report = sparsity_report(model)
        report["counted"] = "masks"
    else:
        per_layer, kept_total, total = {}, 0, 0
        for name, layer in prunable_layers(model):
            kept, n = int(torch.count_nonzero(layer.weight.detach())), layer.weight.numel()
            per_layer[name] = {"kept": kept, "total": n, "keep": kept / n, "rate": kept / n}
            kept_total += kept
            total += n
        report = {"global_keep": kept_total / total if total else 1.0, "kept": kept_total, "total": total,
                  "per_layer": per_layer, "counted": "non-zero weights"}
    report["sparsity"] = 1.0 - report["global_keep"]
    return report
