"""AutoAttack composed from torchattacks' components, run over a whole evaluation set.

Why not `torchattacks.AutoAttack`: it runs APGD, APGD-T and FAB-T with their class default of 10 iterations
instead of the official 100 (github.com/fra31/auto-attack), reports nothing per component, and is usually
called per test batch. Here the official "standard" version (§C.2) is assembled from the same components:

    APGD-CE  100 iterations, 1 restart, rho 0.75
    APGD-T   100 iterations, 1 restart per target, 9 targets
    FAB-T    100 iterations, 1 restart per target, 9 targets
    Square   5000 queries, 1 restart, p_init 0.8, margin loss, resc_schedule False

and scored as official AutoAttack does (§C.3): a point is robust only if it is classified correctly on clean
input and every component so far failed on it; each component runs only on the points that are still robust;
the robust accuracy after each component is recorded; the final number is the per-point worst case.

Targets: torchattacks' APGDT and FAB(multi_targeted=True) take `n_classes` and attack the classes ranked
2 .. n_classes by the clean logits (`logits.sort()[1][:, -t]` for t = 2 .. n_classes). On a point that is
classified correctly the top class is the true one, so `n_classes = min(C, 10)` attacks exactly the top-9
non-true classes by clean logits, as official AutoAttack does (and the top C-1 classes when C < 10).
APGD-T's targeted DLR loss reads the 4th-largest logit, so it needs C >= 4; with fewer classes it is skipped
with a warning (FAB-T still runs with C-1 targets).

Survivors are collected across the whole set and attacked in batches of `batch_size` (as official AutoAttack does
§3.3), so Square's 5000 sequential queries run on large batches rather than on a few survivors per test batch.

The `original` preset reproduces the HARP paper's evaluation: the very component objects that
`torchattacks.AutoAttack(model, norm, eps, version='standard', n_classes=10, seed=seed)` builds (10 iterations
for APGD, APGD-T and FAB-T; Square with torchattacks' resc_schedule=True), composed the same way. The original
passed no seed (time-based, not reproducible); here the seed is given.

Every adversarial point is pulled back into the eps-ball and [clip_min, clip_max] before it is scored, and
the largest perturbation a component returned is recorded, so a component that overshoots the budget can
never count a point outside the threat model.
"""
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from configs.errors import UserError
from trainers.attacks.threat import ThreatModel, perturbation_norms
from trainers.evaluation.ap_protocol import AP_PRESET
from trainers.evaluation.apgd import check_torchattacks, torchattacks_norm
from trainers.evaluation.registry import ATTACKS, AttackOptions, AttackSpec, EvalContext, EvalSettings
from trainers.evaluation.scoring import (PassResult, exceeds_budget, project_and_score, result_entry, score_batches,
                                         stderr)
from utils.modes import eval_mode
from utils.progress import progress
from utils.seed import seed_everything

log = logging.getLogger(__name__)

PRESETS = ("standard", "original", AP_PRESET)  # the AP benchmark runs official AutoAttack standard
COMPONENT_NAMES = ("apgd-ce", "apgd-t", "fab-t", "square")
AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batches = Iterable[Tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Component:
    """One attack of the ensemble: `attack(x, y)` returns adversarial inputs for the points it is given."""
    name: str
    attack: AttackFn
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class AutoAttackResult:
    n: int
    clean_correct: torch.Tensor          # bool [n], CPU
    robust: torch.Tensor                 # bool [n], CPU: final per-point flags (worst case over components)
    predictions: torch.Tensor            # int64 [n], CPU: label predicted on the worst point found
    per_component: Dict[str, Dict[str, Any]]
    seconds: float
    max_perturbation: float              # largest ||x_adv - x|| of the points that count as broken
    adversarial: Optional[torch.Tensor] = None   # [n, ...] on the CPU when asked for (tests, small sets)

    @property
    def clean_acc(self) -> float:
        return 100.0 * float(self.clean_correct.sum()) / max(self.n, 1)

    @property
    def robust_acc(self) -> float:
        return 100.0 * float(self.robust.sum()) / max(self.n, 1)


def target_classes(num_classes: int) -> int:
    """Official AutoAttack's 9 target classes, or every other class when there are fewer than 10."""
    return min(num_classes - 1, 9)


def build_components(model: nn.Module, preset: str, threat: ThreatModel, *, num_classes: int,
                     seed: int) -> List[Component]:
    """The ensemble of `preset` ('standard', 'ap' or 'original') against `threat` (its norm and eps), in run order."""
    if preset in ("standard", AP_PRESET):
        return _standard_components(model, threat.norm, threat.eps, num_classes, seed)
    if preset == "original":
        return _original_components(model, threat.norm, threat.eps, num_classes, seed)
    raise ValueError(f"unknown AutoAttack preset {preset!r}; choose one of: {', '.join(PRESETS)}")


def _standard_components(model, norm, eps, num_classes, seed) -> List[Component]:
    import torchattacks

    ta_norm = torchattacks_norm(norm)
    n_targets = target_classes(num_classes)
    components = [_wrap("apgd-ce", torchattacks.APGD(model, norm=ta_norm, eps=eps, steps=100, n_restarts=1, seed=seed,
                                                     loss="ce", eot_iter=1, rho=0.75))]
    if num_classes >= 4:
        components.append(_wrap("apgd-t", torchattacks.APGDT(model, norm=ta_norm, eps=eps, steps=100, n_restarts=1,
                                                             seed=seed, eot_iter=1, rho=0.75,
                                                             n_classes=n_targets + 1)))
    if num_classes >= 2:
        components.append(_wrap("fab-t", torchattacks.FAB(model, norm=ta_norm, eps=eps, steps=100, n_restarts=1,
                                                          alpha_max=0.1, eta=1.05, beta=0.9, seed=seed,
                                                          multi_targeted=True, n_classes=n_targets + 1)))
    components.append(_wrap("square", torchattacks.Square(model, norm=ta_norm, eps=eps, n_queries=5000, n_restarts=1,
                                                          p_init=0.8, loss="margin", resc_schedule=False, seed=seed)))
    _warn_skipped(components, num_classes)
    return components


def _original_components(model, norm, eps, num_classes, seed) -> List[Component]:
    """The components torchattacks' own AutoAttack class builds with HARP's arguments (eps only, n_classes 10)."""
    import torchattacks

    auto = torchattacks.AutoAttack(model, norm=torchattacks_norm(norm), eps=eps, version="standard",
                                   n_classes=min(num_classes, 10), seed=seed)
    components = []
    for attack in auto._autoattack.attacks:
        name = {"APGD": "apgd-ce", "APGDT": "apgd-t", "FAB": "fab-t", "Square": "square"}[type(attack).__name__]
        if name == "apgd-t" and num_classes < 4:
            continue
        components.append(_wrap(name, attack))
    _warn_skipped(components, num_classes)
    return components


def _warn_skipped(components: List[Component], num_classes: int) -> None:
    skipped = [name for name in COMPONENT_NAMES if name not in {c.name for c in components}]
    if skipped:
        log.warning("AutoAttack: %d classes, so %s skipped (the targeted DLR loss needs at least 4 classes); "
                    "the result is weaker than full AutoAttack", num_classes, ", ".join(skipped))


def _wrap(name: str, attack) -> Component:
    """A torchattacks attack as a Component, with the parameters it will actually run with."""
    kind = type(attack).__name__
    params: Dict[str, Any] = {"implementation": f"torchattacks.{kind}", "seed": attack.seed}
    if kind in ("APGD", "APGDT"):
        params.update(steps=attack.steps, restarts=attack.n_restarts, rho=attack.thr_decr, eot_iter=attack.eot_iter)
        params["loss"] = attack.loss if kind == "APGD" else "dlr-targeted"
        if kind == "APGDT":
            params["target_classes"] = attack.n_target_classes
    elif kind == "FAB":
        params.update(steps=attack.steps, restarts=attack.n_restarts, alpha_max=attack.alpha_max, eta=attack.eta,
                      beta=attack.beta, targeted=attack.multi_targeted)
        if attack.multi_targeted:
            params["target_classes"] = attack.n_target_classes
    elif kind == "Square":
        params.update(queries=attack.n_queries, restarts=attack.n_restarts, p_init=attack.p_init, loss=attack.loss,
                      resc_schedule=attack.rescale_schedule)
    return Component(name, attack, params)


# ----------------------------------------------------------------------------------------------- the run
def run_autoattack(model: nn.Module, make_batches: Callable[[], Batches], components: List[Component],
                   threat: ThreatModel, *, batch_size: int = 1000, seed: int = 0, show_progress: bool = True,
                   keep_adversarial: bool = False, desc: str = "autoattack",
                   clean: Optional[PassResult] = None) -> AutoAttackResult:
    """Official AutoAttack scoring of `components` over every point `make_batches()` yields.

    `make_batches` is called once for the clean pass and once per component, and must yield the same
    points in the same order each time (x inside the threat model's box and y, on the model's device). The model
    is in eval mode throughout; every module's mode is restored afterwards. Each component is seeded with
    `seed` (torch.manual_seed before it starts; torchattacks components also reseed per call). `clean`: the
    caller's clean pass over the same batches (with predictions), so the set is not classified twice.
    """
    started = time.time()
    with eval_mode(model):
        labels, clean_pred = _clean_pass(model, make_batches, clean)
        n = labels.numel()
        robust = clean_pred == labels
        clean_correct = robust.clone()
        predictions = clean_pred.clone()
        adversarial = None
        per_component: Dict[str, Dict[str, Any]] = {}
        max_perturbation = 0.0
        log.info("%s: clean accuracy %.2f%% (%d/%d)", desc, 100.0 * float(robust.sum()) / max(n, 1),
                 int(robust.sum()), n)
        for component in components:
            seed_everything(seed)
            comp_started = time.time()
            todo = int(robust.sum())
            state = _ComponentState(model, component, robust, predictions, threat, keep_adversarial)
            bar = progress(None, total=todo, desc=f"{desc} {component.name}", enabled=show_progress)
            if todo:
                offset = 0
                pending: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
                waiting = 0
                for x, y in make_batches():
                    b = y.shape[0]
                    select = robust[offset:offset + b]
                    if bool(select.any()):
                        index = torch.arange(offset, offset + b)[select]
                        on_device = select.to(y.device)
                        pending.append((x[on_device], y[on_device], index))
                        waiting += index.numel()
                    offset += b
                    while waiting >= batch_size:
                        pending, waiting = state.flush(pending, batch_size, bar)
                while waiting:
                    pending, waiting = state.flush(pending, batch_size, bar)
                if keep_adversarial and state.adversarial:
                    if adversarial is None:
                        adversarial = _clean_copy(make_batches)
                    for index, x_adv in state.adversarial:
                        adversarial[index] = x_adv
            bar.close()
            max_perturbation = max(max_perturbation, state.max_perturbation)
            seconds = time.time() - comp_started
            acc = 100.0 * float(robust.sum()) / max(n, 1)
            per_component[component.name] = dict(robust_acc=acc, seconds=round(seconds, 3), attacked=todo,
                                                  broken=state.broken, **component.params)
            log.info("%s: robust accuracy after %s: %.2f%% (%d points attacked, %d broken, %.1fs)", desc,
                     component.name, acc, todo, state.broken, seconds)
            if exceeds_budget(state.max_raw_perturbation, threat.eps):
                log.warning("%s: %s returned a perturbation of norm %.6g > eps %.6g; those points were projected "
                            "back into the threat model before scoring", desc, component.name,
                            state.max_raw_perturbation, threat.eps)
    if keep_adversarial and adversarial is None:
        adversarial = _clean_copy(make_batches)
    return AutoAttackResult(n=n, clean_correct=clean_correct, robust=robust, predictions=predictions,
                            per_component=per_component, seconds=time.time() - started,
                            max_perturbation=max_perturbation, adversarial=adversarial)


class _ComponentState:
    """Bookkeeping of one component: runs it on a full batch of survivors and updates the shared flags."""

    def __init__(self, model, component: Component, robust, predictions, threat: ThreatModel, keep):
        self.model, self.component, self.robust, self.predictions = model, component, robust, predictions
        self.keep = keep
        self.threat = threat
        self.broken = 0
        self.max_perturbation = 0.0
        self.max_raw_perturbation = 0.0
        self.adversarial: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def flush(self, pending, batch_size, bar):
        x = torch.cat([p[0] for p in pending])
        y = torch.cat([p[1] for p in pending])
        index = torch.cat([p[2] for p in pending])
        rest = [(x[batch_size:], y[batch_size:], index[batch_size:])] if index.numel() > batch_size else []
        x, y, index = x[:batch_size], y[:batch_size], index[:batch_size]
        self._attack(x, y, index)
        bar.update(index.numel())
        return rest, sum(r[2].numel() for r in rest)

    def _attack(self, x, y, index):
        x_raw = self.component.attack(x, y).detach()
        if x_raw.shape != x.shape:
            raise RuntimeError(f"{self.component.name} returned shape {tuple(x_raw.shape)} for input {tuple(x.shape)}")
        scored = project_and_score(self.model, x_raw, x, self.threat)
        self.max_raw_perturbation = max(self.max_raw_perturbation, float(scored.raw_norm))
        x_adv = scored.x_adv
        pred = scored.logits.argmax(dim=1)
        fooled = (pred != y).cpu()
        if bool(fooled.any()):
            hit = index[fooled]
            self.robust[hit] = False
            self.predictions[hit] = pred.cpu()[fooled]
            self.broken += int(fooled.sum())
            self.max_perturbation = max(self.max_perturbation,
                                        float(perturbation_norms(x_adv[fooled.to(x.device)], x[fooled.to(x.device)],
                                                                 self.threat.norm).max()))
            if self.keep:
                self.adversarial.append((hit, x_adv[fooled.to(x.device)].cpu()))


def _clean_pass(model: nn.Module, make_batches, clean: Optional[PassResult]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Labels and clean predictions: the caller's clean pass, else one here. Official AutoAttack's checks
    (randomised or probability outputs, zero gradients, Square's success) run after all attacks of test.py
    (trainers/evaluation/masking_checks.py)."""
    if clean is None:
        clean = score_batches(model, make_batches(), collect=True, desc="autoattack clean", show_progress=False)
    if clean.labels is None:
        raise ValueError("AutoAttack got no examples to evaluate")
    return clean.labels, clean.predictions


def _clean_copy(make_batches) -> torch.Tensor:
    return torch.cat([x.detach().cpu() for x, _ in make_batches()])


def first_points(make_batches: Callable[[], Batches], n: int) -> Callable[[], Batches]:
    """`make_batches` cut after its first `n` points (the last batch sliced)."""
    def batches():
        left = n
        for x, y in make_batches():
            if left <= 0:
                return
            yield x[:left], y[:left]
            left -= y.shape[0]
    return batches


def first_points_of_pass(clean: PassResult, n: int) -> PassResult:
    """The clean pass's per-point records of its first `n` points (what AutoAttack reads of it)."""
    return dataclasses.replace(clean, labels=clean.labels[:n], predictions=clean.predictions[:n], adv_predictions=None)


# ----------------------------------------------------------------------------------------------- registration
@dataclass(frozen=True)
class AutoAttackOptions(AttackOptions):
    batch_size: int = 1000  # survivors per attacked batch
    points: Optional[int] = None  # attack only the first this many evaluated points (None: all)

    @classmethod
    def from_config(cls, cfg, context: EvalContext) -> "AutoAttackOptions":
        """--eval-batch-size, else the dataset's policy for the device (data.info: 1000 on a GPU for small images,
        else --test-batch-size); --autoattack-points."""
        if cfg.eval_batch_size or context.data is None:
            return cls(cfg.eval_batch_size or cfg.test_batch_size, cfg.autoattack_points)
        on_gpu = context.device is not None and context.device.type == "cuda"
        return cls(context.data.info.autoattack_batch_size(on_gpu, cfg.test_batch_size), cfg.autoattack_points)


def check_autoattack(model: nn.Module, settings: EvalSettings, options: AutoAttackOptions, points) -> None:
    if settings.preset not in PRESETS:
        raise UserError(f"unknown AutoAttack preset {settings.preset!r}; choose one of: {', '.join(PRESETS)}")
    check_torchattacks(model, settings, options, points)


def autoattack_entry(model: nn.Module, make_batches: Callable[[], Batches], settings: EvalSettings,
                     options: AutoAttackOptions, clean: PassResult) -> Dict[str, Any]:
    """test.py's `autoattack`: the preset's ensemble over the whole set (or its first `options.points`), as one
    result entry."""
    if options.points is not None and options.points < clean.labels.numel():
        make_batches, clean = first_points(make_batches, options.points), first_points_of_pass(clean, options.points)
    components = build_components(model, settings.preset, settings.threat, num_classes=settings.num_classes,
                                  seed=settings.seed)
    result = run_autoattack(model, make_batches, components, settings.threat, batch_size=options.batch_size,
                            seed=settings.seed, show_progress=settings.show_progress, clean=clean)
    per_component = {name: dict(comp, stderr=stderr(comp["robust_acc"], result.n))
                     for name, comp in result.per_component.items()}
    params = {"preset": settings.preset, "version": "standard", "points": result.n, "batch_size": options.batch_size,
              "seed": settings.seed, "components": list(result.per_component), "per_component": per_component}
    return result_entry(settings, clean.labels, result.predictions, result.seconds, params,
                        max_perturbation=result.max_perturbation, clean_acc=result.clean_acc)


ATTACKS.add("autoattack", AttackSpec(
    "autoattack", "AutoAttack (APGD-CE, APGD-T, FAB-T, Square) over the whole set; --attack-preset standard|original",
    run=autoattack_entry, options=AutoAttackOptions, check=check_autoattack))
