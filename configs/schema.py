"""Every option of the toolkit, declared once as a typed field of `Config`: name, type, default, help, choices
and range check.

The command-line parser, the YAML validation and the frozen `Config` object are all generated from this one
dataclass, so a flag, a config key and an attribute can never drift apart, and an editor sees every field with
its type. Names are the original HARP argument names (`prune_reg`, `batch_size`, ...); both `--prune-reg` and
`--prune_reg` are accepted on the command line.

A field's type decides its kind: `bool` is a flag (`--x` / `--no-x`), `Optional[bool]` a tri-state whose None
means "decided by the exp-mode's recipe", `Optional[List[float]]` a list of numbers, and int/float/str plain
values. Choices that come from a registry of a higher layer (attacks, training objectives) are marked
`from_registry` and checked against the names the entry point passes in (configs/ imports nothing above it).
"""
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from configs.errors import UserError

DATASETS = ("CIFAR10", "CIFAR100", "SVHN", "MNIST", "imagenet", "digits")

# Option value kinds beyond plain Python types.
FLAG = "flag"          # boolean, default False/True, `--x` / `--no-x`
TRISTATE = "tristate"  # boolean or None (None = decided by the experiment mode's recipe)
FLOATS = "floats"      # list of floats (`nargs='+'`)

# Options whose choices are registered names, supplied at parse time: option name -> what the names are. The
# exp-modes come from configs/recipes.py (the resolver adds them); the others from registries of higher layers.
REGISTRY_CHOICES = {"exp_mode": "stage recipe", "trainer": "training loop", "adv_loss": "adversarial objective",
                    "attack_eval": "validation attack"}


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def opt(default, help, group, *, choices=None, check=None, check_text="", scope="both"):
    """A Config field with its CLI/YAML metadata. scope: 'train', 'test' or 'both' (which entry point has the flag)."""
    return field(default=default, metadata=dict(help=help, group=group, choices=choices, check=check,
                                                check_text=check_text, scope=scope))


@dataclass(frozen=True)
class Config:
    """The resolved settings of one run."""
    # --- experiment and stage chaining
    configs: Optional[str] = opt(None, "YAML file applied on top of the dataset preset (configs/config-<dataset>.yml)", "experiment")
    result_dir: str = opt("trained_models", "root of the run-directory tree", "experiment")
    exp_name: Optional[str] = opt(None, "overrides the run's name component (default: 'pretrain' or '<dataset>_<prune_reg>_<stg_id>_<k>')", "experiment")
    exp_mode: str = opt("pretrain", "stage to run", "experiment")
    arch: Optional[str] = opt(None, "architecture name (default from the dataset preset)", "experiment")
    num_classes: Optional[int] = opt(None, "classifier outputs (default: from the dataset)", "experiment", check=_positive, check_text="> 0")
    layer_type: str = opt("subnet", "kept for compatibility: masks are added automatically in every pruning mode", "experiment", choices=("subnet", "dense"))
    init_type: str = opt("kaiming_normal", "conv weight init for a fresh model (VGG supports all three)", "experiment",
                         choices=("kaiming_normal", "kaiming_uniform", "signed_const"))
    source_net: Optional[str] = opt(None, "checkpoint to start from (default: the matching run of the previous stage)", "experiment")
    resume: Optional[str] = opt(None, "resume training from this checkpoint (interrupted runs resume automatically)", "experiment", scope="train")
    evaluate: bool = opt(False, "evaluate the source checkpoint (natural + validation attack) and exit", "experiment", scope="train")
    overwrite: bool = opt(False, "delete an existing finished, interrupted or different run in the same directory and start again from epoch 0", "experiment", scope="train")
    skip_finished: bool = opt(False, "exit 0 without training when the run directory already holds this finished run (scripts rerun safely)", "experiment", scope="train")
    save_dense: bool = opt(False, "also write *_dense.pth.tar: masks folded into plain weights", "experiment", scope="train")
    seed: int = opt(1234, "seed of every random number generator", "experiment", check=_non_negative, check_text=">= 0")
    # --- pruning
    k: Optional[float] = opt(None, "target fraction of weights kept (0.01 = 99 % pruned); required in pruning modes", "pruning",
                   check=lambda v: 0 < v <= 1, check_text="in (0, 1]")
    prune_reg: str = opt("weight", "mask granularity", "pruning", choices=("weight", "channel"))
    stg_id: str = opt("010_uni", "initial per-layer keep rates: <density>_<uni|erk|lamp>, 'original', or FILE:ID / FILE "
                      "(a strategy file: our .yaml or Heracles' .json; a file always sets the start rates, in "
                      "score_prune and lwm_finetune too)", "pruning")
    stg_mode: str = opt("harp", "kept for compatibility (the original ignored it)", "pruning", choices=("harp",))
    alpha: float = opt(0.1, "lower bound of every layer's keep rate as a fraction of k (k_min = alpha*k)", "pruning",
                       check=lambda v: 0 <= v < 1, check_text="in [0, 1)")
    gamma: float = opt(1.0, "initial weight gamma0 of the hardware loss", "pruning", check=_non_negative, check_text=">= 0")
    gamma_dynamic: bool = opt(True, "grow gamma by gamma0 each epoch until the target is reached, then freeze it", "pruning")
    target_floor: bool = opt(True, "hold the learned rates at the target from below: after any step that leaves the soft "
                             "cost under the target, move the rate logits along the cost's gradient back onto it "
                             "(--no-target-floor: the original's hinge alone, which can end far below the target)", "pruning")
    soft_hw: Optional[bool] = opt(None, "add the hardware loss (default: on in rate_prune/harp_prune)", "pruning")
    scaled_score_init: Optional[bool] = opt(None, "scores = sqrt(6/fan_in)*W/max|W| (default: on in *_prune modes)", "pruning")
    rate_stg_init: Optional[bool] = opt(None, "rate logits from --stg_id (default: on in rate/harp modes; else uniform at --k)", "pruning")
    scores_init_type: Optional[str] = opt(None, "random score init when scaled init is off (default: PyTorch's layer init)", "pruning",
                                          choices=("kaiming_normal", "kaiming_uniform", "xavier_uniform", "xavier_normal"))
    freeze_bn: bool = opt(False, "freeze BatchNorm affine parameters in modes that freeze the weights", "pruning")
    gate_settle_epochs: Optional[int] = opt(None, "in-train pruning: the last N epochs project the gates onto the budget, "
                                            "freeze them and train only the weights (default: a quarter of --epochs; 0: the "
                                            "budget loss alone must reach the target)", "pruning",
                                            check=_non_negative, check_text=">= 0", scope="train")
    conv_k: Optional[List[float]] = opt(None, "not supported: per-layer rates come from --stg_id", "pruning")
    shortcut_k: Optional[List[float]] = opt(None, "not supported: per-layer rates come from --stg_id", "pruning")
    fc_k: Optional[List[float]] = opt(None, "not supported: per-layer rates come from --stg_id", "pruning")
    # --- data
    dataset: str = opt("digits", "dataset", "data", choices=DATASETS)
    data_dir: str = opt("./datasets", "where the dataset files are (torchvision layout)", "data")
    download: bool = opt(False, "download CIFAR10/CIFAR100/SVHN/MNIST into --data-dir if missing", "data")
    batch_size: int = opt(128, "training batch size (global, across all processes)", "data", check=_positive, check_text="> 0")
    test_batch_size: int = opt(128, "evaluation batch size", "data", check=_positive, check_text="> 0")
    normalize: bool = opt(False, "normalise inputs inside the model with the dataset mean/std", "data")
    mean: Optional[List[float]] = opt(None, "per-channel mean for --normalize (default: the dataset's)", "data")
    std: Optional[List[float]] = opt(None, "per-channel std for --normalize (default: the dataset's)", "data")
    data_fraction: float = opt(1.0, "random fraction of the training set to use", "data",
                               check=lambda v: 0 < v <= 1, check_text="in (0, 1]")
    val_split: float = opt(0.0, "hold out this fraction of the training set for model selection (0: select on the test set, as the original)", "data",
                           check=lambda v: 0 <= v < 1, check_text="in [0, 1)")
    image_dim: Optional[int] = opt(None, "ImageNet crop size in pixels (default 224)", "data", check=_positive, check_text="> 0")
    workers: Optional[int] = opt(None, "DataLoader worker processes for ImageNet (default min(8, CPUs))", "data", check=_non_negative, check_text=">= 0")
    # --- training
    trainer: str = opt("adv", "training loop: base (natural), adv (adversarial, see --adv-loss), freeadv (Free-AT), "
                       "fast (Fast-AT), smooth (randomized smoothing), crown-ibp and mixtrain (verifiable training)",
                       "training")
    adv_loss: str = opt("pgd", "adversarial training objective", "training")
    epochs: int = opt(100, "training epochs (Free-AT: each epoch replays every batch --n-repeats times)", "training",
                      check=_positive, check_text=">= 1", scope="train")
    optimizer: str = opt("sgd", "optimizer over all trainable parameters", "training", choices=("sgd", "adam", "rmsprop"), scope="train")
    lr: float = opt(0.1, "learning rate", "training", check=_positive, check_text="> 0", scope="train")
    wd: float = opt(1e-4, "weight decay (applied to scores and rate logits too, as the original)", "training",
                    check=_non_negative, check_text=">= 0", scope="train")
    momentum: float = opt(0.9, "SGD momentum", "training", check=lambda v: 0 <= v < 1, check_text="in [0, 1)", scope="train")
    lr_schedule: str = opt("cosine", "per-epoch learning-rate schedule", "training", choices=("cosine", "step", "constant"), scope="train")
    warmup_epochs: int = opt(0, "epochs at --warmup-lr with --warmup-loss before the schedule starts", "training",
                             check=_non_negative, check_text=">= 0", scope="train")
    warmup_lr: float = opt(0.1, "learning rate during warm-up", "training", check=_positive, check_text="> 0", scope="train")
    warmup_loss: str = opt("nat", "objective during warm-up", "training", choices=("nat", "fgsm", "pgd", "trades"), scope="train")
    n_repeats: int = opt(4, "Free-AT replays per batch", "training", check=_positive, check_text=">= 1", scope="train")
    fast_step: Optional[float] = opt(None, "FGSM step of --trainer fast (default 1.25 * --epsilon, Wong et al. 2020)", "training",
                                     check=_positive, check_text="> 0", scope="train")
    overfit_guard: str = opt("warn", "--trainer fast: on catastrophic overfitting (PGD validation accuracy collapses while "
                             "FGSM training accuracy rises) warn, stop the run before its next epoch, or do nothing", "training",
                             choices=("warn", "stop", "off"), scope="train")
    overfit_drop: float = opt(20.0, "drop of PGD validation accuracy below its best so far (percentage points) that "
                              "counts as a collapse for --overfit-guard", "training", check=_positive, check_text="> 0", scope="train")
    val_method: str = opt("adv", "per-epoch validation: base (natural only), adv/freeadv (natural + the loop's robust "
                          "measure: --attack_eval, smoothed accuracy under --trainer smooth, IBP-verified accuracy under "
                          "crown-ibp, symbolic-verified under mixtrain), smooth (smoothed classifier, 10 noise draws), "
                          "ibp / sym (verified at --epsilon by IBP / symbolic intervals)",
                          "training", choices=("base", "adv", "freeadv", "smooth", "ibp", "sym"))
    attack_eval: str = opt("pgd", "attack used by per-epoch validation", "training", scope="train")
    noise_std: float = opt(0.25, "randomized smoothing: std of the Gaussian noise on [0, 1] inputs (--trainer smooth, "
                           "--val-method smooth, test.py's certify)", "training", check=_positive, check_text="> 0")
    smooth_loss: str = opt("kl", "--trainer smooth's loss: kl (Hydra: CE + beta * KL(clean || noisy)) or gaussian "
                           "(Cohen et al.: CE on noisy inputs)", "training", choices=("kl", "gaussian"), scope="train")
    schedule_length: int = opt(0, "CROWN-IBP, MixTrain: epochs over which eps ramps from --starting-epsilon to "
                               "--epsilon (CROWN-IBP: per step, 0 and 1 mean none; MixTrain: per epoch, Hydra's "
                               "first epochs at --starting-epsilon, 0 means none)", "training", check=_non_negative,
                               check_text=">= 0", scope="train")
    schedule_start: int = opt(0, "CROWN-IBP, MixTrain: epoch at which the eps ramp starts", "training",
                              check=_non_negative, check_text=">= 0", scope="train")
    starting_epsilon: float = opt(0.0, "CROWN-IBP, MixTrain: eps at the start of the ramp", "training",
                                  check=_non_negative, check_text=">= 0", scope="train")
    mixtrain_k: int = opt(1, "MixTrain: points drawn (with replacement) from a batch for the symbolic robust loss "
                          "(Hydra's --mixtraink)", "training", check=_positive, check_text=">= 1", scope="train")
    interval_weight: float = opt(0.1, "MixTrain: weight of the symbolic robust loss, x2.5 every 5 epochs after the "
                                 "eps ramp, at most 50", "training", check=_non_negative, check_text=">= 0",
                                 scope="train")
    val_every: int = opt(1, "validate every N epochs (and always after the last)", "training", check=_positive, check_text=">= 1", scope="train")
    # --- threat model (training, validation and the default of test.py)
    epsilon: float = opt(8 / 255, "perturbation budget", "attack", check=_non_negative, check_text=">= 0")
    num_steps: int = opt(10, "PGD steps in training and validation", "attack", check=_non_negative, check_text=">= 0")
    step_size: float = opt(2 / 255, "PGD step size", "attack", check=_non_negative, check_text=">= 0")
    clip_min: float = opt(0.0, "lower pixel bound", "attack")
    clip_max: float = opt(1.0, "upper pixel bound", "attack")
    distance: str = opt("l_inf", "threat model norm", "attack", choices=("l_inf", "l_2"))
    const_init: bool = opt(False, "no random start in validation attacks (the original's behaviour of this flag)", "attack")
    beta: float = opt(6.0, "TRADES/MART robust-loss weight (presets: 6 for TRADES, 5 for MART)", "attack", check=_non_negative, check_text=">= 0")
    # --- runtime
    device: str = opt("auto", "auto, cpu, cuda or cuda:N", "runtime")
    gpu: Optional[str] = opt(None, "original-style GPU id list; the first id selects cuda:N (use torchrun for several GPUs)", "runtime")
    no_cuda: bool = opt(False, "run on the CPU even if a GPU is present", "runtime")
    print_freq: int = opt(10, "batches between progress-bar metric refreshes", "runtime", check=_positive, check_text=">= 1")
    no_progress: bool = opt(False, "no progress bars (they are also off when stderr is not a terminal)", "runtime")
    bf16: bool = opt(False, "bf16 autocast for training steps (evaluation stays fp32)", "runtime", scope="train")
    channels_last: bool = opt(False, "channels_last memory format for training", "runtime", scope="train")
    compile: bool = opt(False, "torch.compile the model for training", "runtime", scope="train")
    tensorboard: bool = opt(False, "also write each epoch's metrics as TensorBoard scalars to <run>/tensorboard "
                            "(needs the tensorboard package)", "runtime", scope="train")
    # --- evaluation (test.py)
    attacks: str = opt("all", "comma-separated attacks (or 'all'; 'help' lists them)", "evaluation", scope="test")
    attack_preset: str = opt("standard", "standard: official AutoAttack settings; original: the HARP paper's torchattacks defaults; "
                             "ap: the Adversarial Pruning benchmark's protocol (AutoAttack at Linf 0.031 on the first 10,000 "
                             "test points, HO-FMN on points [2048, 2176), its counting and units)", "evaluation",
                             choices=("standard", "original", "ap"), scope="test")
    n_examples: Optional[int] = opt(None, "evaluate the first N test examples (default: all)", "evaluation", check=_positive, check_text="> 0", scope="test")
    autoattack_points: Optional[int] = opt(None, "run AutoAttack on the first N of the evaluated examples only (default: all; "
                                           "its entry records the points and its standard error)", "evaluation",
                                           check=_positive, check_text="> 0", scope="test")
    checkpoint: str = opt("best", "which checkpoint of the run to evaluate", "evaluation", choices=("best", "last", "best_dense", "last_dense"), scope="test")
    results_file: Optional[str] = opt(None, "also write the result JSON here", "evaluation", scope="test")
    eval_batch_size: Optional[int] = opt(None, "batch size of the attacks (default: --test-batch-size; AutoAttack on a GPU: 1000 "
                                         "survivors per batch)", "evaluation", check=_positive, check_text="> 0", scope="test")
    certify_n0: int = opt(100, "certify: noise draws per point that select the top class (Cohen et al.'s N0)",
                          "evaluation", check=_positive, check_text="> 0", scope="test")
    certify_n: int = opt(10000, "certify: noise draws per point that bound its probability (N; PREDICT draws as many)",
                         "evaluation", check=_positive, check_text="> 0", scope="test")
    certify_alpha: float = opt(0.001, "certify: failure probability of each certificate and of PREDICT's test",
                               "evaluation", check=lambda v: 0 < v < 1, check_text="in (0, 1)", scope="test")
    certify_radii: Optional[List[float]] = opt(None, "certify: L2 radii of the certified-accuracy curve (default 0, "
                                               "0.25, ..., 1.5)", "evaluation", scope="test")
    epsilons: Optional[str] = opt(None, "comma-separated budgets for a security curve: PGD (--num-steps steps, step size "
                                  "eps * step_size/epsilon) at each, stored as security_curve in the result JSON", "evaluation", scope="test")
    fmn_steps: int = opt(100, "fmn: attack steps (--attack-preset ap: the benchmark's 200)", "evaluation",
                         check=_positive, check_text=">= 1", scope="test")
    fmn_tune: int = opt(0, "fmn: try N configurations (step size, momentum, optimizer, schedule, loss) on tuning points "
                        "disjoint from the evaluated ones and keep the one with the smallest median distance (0: FMN's "
                        "default; --attack-preset ap: 32 trials on test points [0, 64))", "evaluation",
                        check=_non_negative, check_text=">= 0", scope="test")
    fmn_tune_search: str = opt("random", "fmn: search of --fmn-tune", "evaluation", choices=("random", "halving"),
                               scope="test")
    fmn_tune_points: int = opt(64, "fmn: tuning points: the first N of the held-out split (--val-split > 0), else of "
                               "the training set", "evaluation", check=_positive, check_text="> 0", scope="test")


@dataclass(frozen=True)
class Option:
    """One field of Config as the parser and the YAML validation see it."""
    name: str
    kind: Any                      # int, float, str, FLAG, TRISTATE or FLOATS
    default: Any
    help: str
    group: str
    choices: Optional[Tuple[str, ...]] = None
    check: Optional[Callable[[Any], bool]] = None   # range check on a non-None value
    check_text: str = ""                            # what `check` requires, for the error message
    scope: str = "both"                             # 'train', 'test' or 'both'


def _kind(annotation) -> Any:
    """The option kind of a Config field's type annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) is typing.Union else annotation
    if base is bool:
        return TRISTATE if args else FLAG
    if typing.get_origin(base) in (list, List):
        return FLOATS
    return base


def _options() -> Tuple[Option, ...]:
    hints = typing.get_type_hints(Config)
    return tuple(Option(f.name, _kind(hints[f.name]), f.default, **f.metadata) for f in dataclasses.fields(Config))


OPTIONS: Tuple[Option, ...] = _options()
OPTION_BY_NAME: Dict[str, Option] = {o.name: o for o in OPTIONS}


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def coerce_value(name: str, value: Any, source: str, choices: Optional[Mapping[str, Sequence[str]]] = None) -> Any:
    """Convert a YAML or CLI value to the option's type, match choices, and range-check it.

    `choices` supplies the names of the registry-backed options (REGISTRY_CHOICES); without it they are not
    checked here (the registry still refuses an unknown name when the run is set up).
    """
    opt = OPTION_BY_NAME.get(name)
    if opt is None:
        raise UserError(f"unknown option {name!r} in {source}")
    if value is None:
        return None
    try:
        if opt.kind in (FLAG, TRISTATE):
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                value = value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
        elif opt.kind == FLOATS:
            value = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        elif opt.kind is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            value = float(value)
        elif opt.kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            value = int(value)
        else:
            value = str(value)
    except (TypeError, ValueError) as err:
        raise UserError(f"bad value {value!r} for {name} in {source}: {err}") from None
    allowed = opt.choices or ((choices or {}).get(name) if name in REGISTRY_CHOICES else None)
    if allowed is not None:
        value = match_choice(name, value, tuple(allowed), source)
    if opt.check is not None and not opt.check(value):
        raise UserError(f"{name} must be {opt.check_text}, got {value!r} ({source})")
    return value


def match_choice(name: str, value: str, choices: Tuple[str, ...], source: str) -> str:
    """Case-insensitive, with '-' and '_' equivalent (so `harp-prune` and `cifar10` are accepted)."""
    def norm(s):
        return s.lower().replace("-", "_")

    for choice in choices:
        if norm(choice) == norm(value):
            return choice
    raise UserError(f"bad value {value!r} for {name} in {source}; choose one of: {', '.join(choices)}")
