"""Compute estimate of a plan from scripts/benchmark.py's measured step times (FORMULA below).

A benchmark JSON (python scripts/benchmark.py --device cuda --arch ARCH --dataset DATASET --batch-size B --out F)
gives, for one architecture and input shape, seconds per image of a plain training step (s_plain), a PGD-10 AT
step (s_at), a harp_prune PGD-10 step (s_prune), a finetune step relative to a plain one (R3) and an eval forward
(s_fwd); for a model the bounds can walk also Hydra's certified objectives (s_smooth, s_crown, s_ibp, the symbolic
robust loss per point s_sym, per image the verification of each bound, s_verify[b], and one certify draw, s_draw),
measured on a random model at the benchmark's --epsilon on its images (real test images with --data-dir): the
bounds' cost grows with the unstable ReLUs, so this overestimates a model trained to be verifiable. AutoAttack's cost model is AutoAttack's per-component iteration counts, priced in attack steps, with the clean and
robust fractions assumed at 0.8 and 0.48 (adversarially trained CIFAR models); it is the least certain term. Stages shared
by several cells count once. The result is in hours of the benchmark's device (GPU hours when it ran on CUDA), one
stage at a time on one device.
"""
import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from configs.errors import UserError
from configs.recipes import RECIPES
from data.info import dataset_info
from scripts.reproduction.plan import TEST, TRAIN, Graph, Stage
from trainers.certify.bounds import METHODS as BOUNDS
from trainers.evaluation.ap_protocol import AP_AA_POINTS, AP_PRESET, preset_attacks
from trainers.evaluation.minimum_norm import FMN, FMNOptions, ap_fmn_plan
from trainers.evaluation.validation import validation_options
from trainers.mixtrain import MIXTRAIN_PROBABILITY

# Training / test split sizes of the standard datasets (torchvision's; digits: this toolkit's fixed split).
SPLIT_SIZES = {"CIFAR10": (50000, 10000), "CIFAR100": (50000, 10000), "SVHN": (73257, 26032),
               "MNIST": (60000, 10000), "imagenet": (1281167, 50000), "digits": (1437, 360)}
FORMULA = """\
With N training images (the split's size x --data-fraction), M validation images, E epochs (+ warm-up), K attack
steps (--num-steps) and seconds per image s_* from the benchmark:
  adversarial step  s_adv(K) = s_plain + K/10 (s_at - s_plain)
  pretrain          E N s_adv(K)                   (--trainer fast: s_fast, else 2 s_plain; freeadv, base: below)
  prune             E N s_adv(K) s_prune/s_at      (masked layers learning scores and rates)
  finetune          E N s_adv(K) R3                (frozen masks)
  Free-AT           E N m s_plain                  (m = --n-repeats; x s_prune/s_at when pruning, x R3 finetuning)
  natural training  E N s_plain                    (x R3 when finetuning)
  smoothing         E N s_smooth                   (--smooth-loss gaussian: s_plain; pruning and finetuning as above)
  CROWN-IBP         N (E_r s_crown + (E - E_r) s_ibp)    (E_r epochs of the eps ramp, where beta > 0)
  MixTrain          E N (s_plain + 0.8 k s_sym / B)      (k = --mixtrain-k, B = --batch-size)
  validation        V M (s_adv(K) - s_plain + 2 s_fwd)   (V validated epochs; M s_fwd with --val-method base;
                    smooth 11 s_fwd; ibp / sym: s_verify[b] + s_fwd)
  every stage       + 4 s of start-up (interpreter, imports, data, model)
  test              n sum_a (s_fwd + S_a s_step) + n sum_b s_verify[b]   (n test images; s_step one attack step,
                    pgd10_eval / 10 (2 s_fwd without it); S_a the steps per image of attack a: natural 0, fgsm 1,
                    pgdK K, cw 20, apgd 250, autoattack p_clean 100 a + p_robust (900 a + 900 f + 5000 q) with
                    a, f, q = 1.2, 4.0, 0.73 steps per APGD, FAB and Square iteration (measured on the CPU);
                    certify (N0 + 2N) s_draw (s_fwd without it); b the bounds ibp, sym, crown-ibp; AutoAttack
                    on min(n, --autoattack-points) images)
                    + T P_t (s_fwd + S_t s_step) + P (s_fwd + S s_step)   (fmn: T tuning trials of S_t steps on
                    P_t tuning points, then S steps on its P attacked points)
  --attack-preset ap  `all` is natural, autoattack and fmn; n = min(test set, --n-examples, 10,000); FMN tunes 32
                    trials of 100 steps on 64 points and attacks 128 points for 200 steps"""
# AutoAttack's survivors (see the module docstring): clean-correct and robust fractions.
AA_CLEAN, AA_ROBUST = 0.8, 0.48
# AutoAttack's components per point and iteration, in attack steps (PGD's), as measured by test.py on the 2-core
# CPU (MNIST, cifar_model, 200 points: APGD-T 7.7e-5 s, FAB-T 2.6e-4 s, Square 4.7e-5 s against PGD-50's 6.4e-5 s
# per point and step). Square's query is a forward, but its per-query bookkeeping costs as much again on small
# batches of survivors. The least certain term of the model, together with AA_ROBUST.
AA_STEP_COST = {"apgd": 1.2, "fab": 4.0, "square": 0.73}
# Seconds every stage spends before its first step: the interpreter, torch and the toolkit imported, the data
# loaded, the model built (about 4 s per train.py / test.py process on the 2-core CPU, digits or MNIST).
STARTUP_SECONDS = 4.0


def attack_steps(name: str, preset: str = "standard") -> Optional[float]:
    """Attack steps per test image of one test.py attack, besides its clean forward (a step: a forward and a
    backward to the input, s_step); None for what this model does not price in steps (certify, the bounds)."""
    pgd = {"pgd10": 10, "pgd20": 20, "pgd50": 50}
    if name == "natural":
        return 0.0
    if name == "fgsm":
        return 1.0
    if name in pgd:
        return float(pgd[name])
    if name == "cw":
        return 20.0
    if name == "apgd":
        return 5 * 50.0
    if name == "autoattack":
        iterations = 10 if preset == "original" else 100
        apgd, fab, square = AA_STEP_COST["apgd"], AA_STEP_COST["fab"], AA_STEP_COST["square"]
        survivors = 9 * iterations * apgd + 9 * iterations * fab + 5000 * square  # APGD-T + FAB-T + Square
        return AA_CLEAN * iterations * apgd + AA_ROBUST * survivors
    return None


@dataclass(frozen=True)
class Bench:
    """Seconds per image of the benchmark's configurations, for one arch and input shape."""
    path: str
    arch: str
    shape: Tuple[int, ...]
    device: str
    s_plain: float
    s_at: float
    s_prune: float
    r3: float
    s_fwd: float
    # Optional (None: the benchmark did not time them; the certified ones need a model the bounds can walk, a plain
    # Sequential; older benchmark files lack fast_at and pgd10_eval). Use the properties below for the fallbacks.
    s_smooth: Optional[float] = None
    s_crown: Optional[float] = None
    s_ibp: Optional[float] = None
    s_sym: Optional[float] = None
    s_verify: Optional[Dict[str, float]] = None   # bound name -> seconds per verified image
    s_draw: Optional[float] = None                # one noisy copy classified and counted by certify
    s_fast: Optional[float] = None                # a Fast-AT training step
    s_step: Optional[float] = None                # one attack step of test.py (a tenth of pgd10_eval)

    @property
    def attack_step(self) -> float:
        """Seconds of one attack step per image: measured, else a forward and a backward (2 s_fwd)."""
        return self.s_step if self.s_step is not None else 2 * self.s_fwd

    @property
    def fast_at_step(self) -> float:
        """Seconds of one Fast-AT training step per image: measured, else one FGSM step and the update (2 s_plain)."""
        return self.s_fast if self.s_fast is not None else 2 * self.s_plain

    @property
    def certify_draw(self) -> float:
        """Seconds of one certify draw per image: measured, else a forward (s_fwd)."""
        return self.s_draw if self.s_draw is not None else self.s_fwd


# The benchmark's configurations behind the optional Bench fields: field -> (configuration, units per image it
# times; pgd10_eval times ten attack steps), and those of the bounds' verification.
OPTIONAL_FIELDS = {"s_smooth": ("smooth_train", 1), "s_crown": ("crown_ibp_train", 1), "s_ibp": ("ibp_train", 1),
                   "s_sym": ("sym_train", 1), "s_draw": ("certify_draws", 1), "s_fast": ("fast_at", 1),
                   "s_step": ("pgd10_eval", 10)}
VERIFY_CONFIGS = {"ibp": "ibp_verify", "sym": "sym_verify", "crown-ibp": "crown_ibp_verify"}


def load_bench(path: str) -> Bench:
    try:
        with open(path) as fh:
            data = json.load(fh)
        rate = data["images_per_s"]
        optional = {field: 1 / rate[config] / units for field, (config, units) in OPTIONAL_FIELDS.items()
                    if config in rate}
        verify = {bound: 1 / rate[config] for bound, config in VERIFY_CONFIGS.items() if config in rate}
        return Bench(path, data["arch"], tuple(data["input_shape"]),
                     f"{data.get('device_name', data['device'])} ({data['device']})", 1 / rate["plain_train"],
                     1 / rate["pgd10_at"], 1 / rate["pgd10_harp_prune"], float(data["R3"]), 1 / rate["forward_plain"],
                     s_verify=verify or None, **optional)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as err:
        raise UserError(f"{path} is not a scripts/benchmark.py result ({type(err).__name__}: {err})") from None


@dataclass
class StageCost:
    stage: Stage
    hours: Optional[float]
    images: float        # images through a training step (train) or test images (test)
    missing: str = ""    # why there is no estimate


def _bench_for(stage: Stage, benches: Sequence[Bench]) -> Optional[Bench]:
    info = dataset_info(stage.cfg.dataset, stage.cfg.image_dim)
    shape = (info.in_channels, info.image_size, info.image_size)
    return next((b for b in benches if b.arch == stage.cfg.arch and b.shape == shape), None)


def stage_cost(stage: Stage, benches: Sequence[Bench]) -> StageCost:
    cfg = stage.cfg
    n_train, n_test = SPLIT_SIZES[cfg.dataset]
    n_pool = n_train * cfg.data_fraction   # the training images drawn, of which --val-split are held out
    n_train = n_pool * (1 - (cfg.val_split or 0))
    if stage.kind == TEST:
        return _test_cost(stage, benches, n_test)
    epochs = cfg.epochs + cfg.warmup_epochs
    bench = _bench_for(stage, benches)
    if bench is None:
        return StageCost(stage, None, epochs * n_train)
    step = _train_step_seconds(stage, bench)
    if step is None:
        return StageCost(stage, None, epochs * n_train, f"no cost model for --trainer {cfg.trainer}")
    n_val = cfg.val_split * n_pool if cfg.val_split else n_test
    validations = math.ceil(epochs / cfg.val_every) + (1 if RECIPES[cfg.exp_mode].masked else 0)
    s_val = _validation_seconds(cfg, bench)
    if s_val is None:
        return StageCost(stage, None, epochs * n_train, f"no cost model for --val-method {cfg.val_method}")
    seconds = STARTUP_SECONDS + epochs * n_train * step + validations * n_val * s_val
    return StageCost(stage, seconds / 3600, epochs * n_train)


def _test_cost(stage: Stage, benches: Sequence[Bench], n_test: int) -> StageCost:
    """A test stage: every attack on the points it runs on (the AP preset's attacks and points under it)."""
    cfg = stage.cfg
    ap = cfg.attack_preset == AP_PRESET
    n = min(cfg.n_examples or n_test, n_test, AP_AA_POINTS if ap else n_test)
    bench = _bench_for(stage, benches)
    if bench is None:
        return StageCost(stage, None, n)
    attacks = preset_attacks(cfg.attacks, cfg.attack_preset)
    try:
        seconds = {a: _attack_seconds(a, cfg, bench, n) for a in attacks}
    except UserError as err:  # the test itself would refuse these settings
        return StageCost(stage, None, n, str(err))
    unknown = [a for a, s in seconds.items() if s is None]
    if unknown:
        return StageCost(stage, None, n, f"no cost model for {', '.join(unknown)}")
    return StageCost(stage, (STARTUP_SECONDS + sum(seconds.values())) / 3600, n)


def _attack_seconds(name: str, cfg, bench: Bench, n: int) -> Optional[float]:
    """Seconds of one attack or bound over the n evaluated points (AutoAttack on its first --autoattack-points)."""
    if name == FMN:
        forwards, steps = fmn_work(cfg, n)
        return forwards * bench.s_fwd + steps * bench.attack_step
    per_image = _test_seconds(name, cfg, bench)
    points = min(n, cfg.autoattack_points or n) if name == "autoattack" else n
    return None if per_image is None else points * per_image


def fmn_work(cfg, n: int) -> Tuple[float, float]:
    """(clean forwards, attack steps) of FMN on n evaluated points, both counted per point: its tuning (trials x
    tuning points x steps) and its attack (attacked points x steps); under the AP preset the benchmark's HO-FMN
    (minimum_norm.ap_fmn_plan), else --fmn-tune trials of --fmn-steps on --fmn-tune-points, then every point."""
    if cfg.attack_preset == AP_PRESET:
        plan = ap_fmn_plan(FMNOptions(tune=cfg.fmn_tune), n)
        trials, tune_steps, steps = plan.trials, plan.tune_steps, plan.steps
        tune_points, attacked = plan.tune_points[1] - plan.tune_points[0], plan.points[1] - plan.points[0]
    else:
        trials, tune_steps, steps = cfg.fmn_tune, cfg.fmn_steps, cfg.fmn_steps
        tune_points, attacked = cfg.fmn_tune_points, n
    return trials * tune_points + attacked, trials * tune_points * tune_steps + attacked * steps


def _test_seconds(name: str, cfg, bench: Bench) -> Optional[float]:
    """Seconds per test image of one per-image attack or bound."""
    if name in BOUNDS:
        return (bench.s_verify or {}).get(name)
    if name == "certify":
        draws = cfg.certify_n0 + 2 * cfg.certify_n
        return draws * bench.certify_draw
    steps = attack_steps(name, cfg.attack_preset)
    return None if steps is None else bench.s_fwd + steps * bench.attack_step


def _validation_seconds(cfg, bench: Bench) -> Optional[float]:
    """Seconds per validation image of the run's measure (trainers/evaluation/validation.py)."""
    method = validation_options(cfg)["method"]
    if method == "base":
        return bench.s_fwd
    if method == "smooth":
        return 11 * bench.s_fwd   # the clean pass and 10 noise draws
    if method in BOUNDS:
        verify = (bench.s_verify or {}).get(method)
        return None if verify is None else verify + bench.s_fwd
    return _adv(bench, cfg.num_steps) - bench.s_plain + 2 * bench.s_fwd


def _adv(bench: Bench, steps: int) -> float:
    return bench.s_plain + steps / 10 * (bench.s_at - bench.s_plain)


def _train_step_seconds(stage: Stage, bench: Bench) -> Optional[float]:
    """Seconds per training image of one step of this stage."""
    cfg, spec = stage.cfg, RECIPES[stage.mode]
    pruning = spec.masked and not spec.freeze_masks
    masks = bench.s_prune / bench.s_at if pruning else (bench.r3 if spec.masked else 1.0)
    if cfg.trainer == "freeadv":
        return cfg.n_repeats * bench.s_plain * masks
    if cfg.trainer == "fast":
        return bench.fast_at_step * masks
    if cfg.trainer == "base" or cfg.adv_loss == "nat":
        return bench.s_plain * masks
    if cfg.trainer == "adv":
        return _adv(bench, cfg.num_steps) * masks
    certified = _certified_step_seconds(cfg, bench)
    return None if certified is None else certified * masks


def _certified_step_seconds(cfg, bench: Bench) -> Optional[float]:
    """Seconds per training image of a dense step of Hydra's certified loops (None: not benchmarked)."""
    if cfg.trainer == "smooth":
        return bench.s_plain if cfg.smooth_loss == "gaussian" else bench.s_smooth
    if cfg.trainer == "crown-ibp" and bench.s_crown is not None:
        epochs = cfg.epochs + cfg.warmup_epochs
        # beta > 0 until the start of epoch schedule_start + schedule_length - 1 (no ramp at all for length <= 1)
        ramp = min(epochs, cfg.schedule_start + cfg.schedule_length - 1) if cfg.schedule_length > 1 else 0
        return (ramp * bench.s_crown + (epochs - ramp) * bench.s_ibp) / epochs
    if cfg.trainer == "mixtrain" and bench.s_sym is not None:
        return bench.s_plain + MIXTRAIN_PROBABILITY * cfg.mixtrain_k * bench.s_sym / cfg.batch_size
    return None


def estimate(graph: Graph, benches: Sequence[Bench]) -> Dict[str, List[StageCost]]:
    """Every stage's cost, grouped by dataset (one table per dataset)."""
    out: Dict[str, List[StageCost]] = {}
    for stage in graph.stages.values():
        out.setdefault(stage.cfg.dataset, []).append(stage_cost(stage, benches))
    return out


def report(graph: Graph, benches: Sequence[Bench]) -> List[str]:
    """Lines: per table (dataset) the hours per stage kind and in total, and what is missing for the rest."""
    lines = []
    needed: Dict[Tuple[str, str], str] = {}
    devices = sorted({b.device for b in benches})
    unit = "GPU hours" if any("(cuda" in d for d in devices) else "device hours"
    for dataset, costs in estimate(graph, benches).items():
        by_kind: Dict[str, float] = {}
        images = 0.0
        for cost in costs:
            if cost.stage.kind == TRAIN:
                images += cost.images
            if cost.hours is not None:
                by_kind[cost.stage.stage] = by_kind.get(cost.stage.stage, 0.0) + cost.hours
            elif not cost.missing:
                needed[(cost.stage.cfg.arch, dataset)] = (
                    f"python scripts/benchmark.py --device cuda --arch {cost.stage.cfg.arch} --dataset {dataset} "
                    f"--batch-size {cost.stage.cfg.batch_size} --out bench-{cost.stage.cfg.arch}-{dataset}.json")
        trains = sum(1 for c in costs if c.stage.kind == TRAIN)
        tests = len(costs) - trains
        known = [c for c in costs if c.hours is not None]
        lines.append(f"{dataset}: {trains} train stages ({images / 1e6:.2f}M training images through a step), "
                     f"{tests} tests")
        if known:
            parts = ", ".join(f"{kind} {hours:.1f}" for kind, hours in by_kind.items())
            lines.append(f"  {sum(by_kind.values()):.1f} {unit} for {len(known)} of {len(costs)} stages "
                         f"({parts})")
        for cost in costs:
            if cost.missing:
                lines.append(f"  {cost.stage.label}: {cost.missing}")
    if needed:
        lines.append("no benchmark for these (arch, dataset) pairs; measure them with:")
        lines += [f"  {command}" for command in needed.values()]
    if benches:
        lines.append("from " + ", ".join(f"{b.path} ({b.arch}, {b.device})" for b in benches))
    else:
        lines += FORMULA.splitlines()
    return lines
