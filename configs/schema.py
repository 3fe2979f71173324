"""Every option of the toolkit, declared once: name, type, default, choices, range check and help.

The command-line parser, the YAML validation and the frozen `Config` object are all generated from
this table, so a flag, a config key and an attribute can never drift apart. Names are the original
HARP argument names (`prune_reg`, `batch_size`, ...); both `--prune-reg` and `--prune_reg` are
accepted on the command line.
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from configs.errors import UserError
from configs.modes import MODE_NAMES

DATASETS = ("CIFAR10", "CIFAR100", "SVHN", "MNIST", "imagenet", "digits")
ATTACK_NAMES = ("natural", "fgsm", "pgd10", "pgd20", "pgd50", "cw", "apgd", "autoattack")

# Option value kinds beyond plain Python types.
FLAG = "flag"          # boolean, default False/True, `--x` / `--no-x`
TRISTATE = "tristate"  # boolean or None (None = decided by the experiment mode)
FLOATS = "floats"      # list of floats (`nargs='+'`)


@dataclass(frozen=True)
class Option:
    name: str
    kind: Any                      # int, float, str, FLAG, TRISTATE or FLOATS
    default: Any
    help: str
    group: str
    choices: Optional[Tuple[str, ...]] = None
    check: Optional[Callable[[Any], bool]] = None   # range check on a non-None value
    check_text: str = ""                            # what `check` requires, for the error message
    scope: str = "both"                             # 'train', 'test' or 'both'


def _opt(name, kind, default, help, group, choices=None, check=None, check_text="", scope="both"):
    return Option(name, kind, default, help, group, choices, check, check_text, scope)


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


OPTIONS: Tuple[Option, ...] = (
    # --- experiment and stage chaining
    _opt("configs", str, None, "YAML file applied on top of the dataset preset (configs/config-<dataset>.yml)", "experiment"),
    _opt("result_dir", str, "trained_models", "root of the run-directory tree", "experiment"),
    _opt("exp_name", str, None, "overrides the run's name component (default: 'pretrain' or '<dataset>_<prune_reg>_<stg_id>_<k>')", "experiment"),
    _opt("exp_mode", str, "pretrain", "stage to run", "experiment", choices=MODE_NAMES),
    _opt("arch", str, None, "architecture name (default from the dataset preset)", "experiment"),
    _opt("num_classes", int, None, "classifier outputs (default: from the dataset)", "experiment", check=_positive, check_text="> 0"),
    _opt("layer_type", str, "subnet", "kept for compatibility: masks are added automatically in every pruning mode", "experiment", choices=("subnet", "dense")),
    _opt("init_type", str, "kaiming_normal", "conv weight init for a fresh model (VGG supports all three)", "experiment",
         choices=("kaiming_normal", "kaiming_uniform", "signed_const")),
    _opt("source_net", str, None, "checkpoint to start from (default: the matching run of the previous stage)", "experiment"),
    _opt("resume", str, None, "resume training from this checkpoint (interrupted runs resume automatically)", "experiment", scope="train"),
    _opt("evaluate", FLAG, False, "evaluate the source checkpoint (natural + validation attack) and exit", "experiment", scope="train"),
    _opt("overwrite", FLAG, False, "delete an existing finished or different run in the same directory and start again", "experiment", scope="train"),
    _opt("save_dense", FLAG, False, "also write *_dense.pth.tar: masks folded into plain weights", "experiment", scope="train"),
    _opt("seed", int, 1234, "seed of every random number generator", "experiment", check=_non_negative, check_text=">= 0"),
    # --- pruning
    _opt("k", float, 1.0, "target fraction of weights kept (0.01 = 99 % pruned)", "pruning",
         check=lambda v: 0 < v <= 1, check_text="in (0, 1]"),
    _opt("prune_reg", str, "weight", "mask granularity", "pruning", choices=("weight", "channel")),
    _opt("stg_id", str, "010_uni", "initial per-layer keep rates: <density>_<uni|erk|lamp> or 'original'", "pruning"),
    _opt("stg_mode", str, "harp", "kept for compatibility (the original ignored it)", "pruning", choices=("harp",)),
    _opt("alpha", float, 0.1, "lower bound of every layer's keep rate as a fraction of k (k_min = alpha*k)", "pruning",
         check=lambda v: 0 <= v < 1, check_text="in [0, 1)"),
    _opt("gamma", float, 1.0, "initial weight gamma0 of the hardware loss", "pruning", check=_non_negative, check_text=">= 0"),
    _opt("gamma_dynamic", FLAG, True, "grow gamma by gamma0 each epoch until the target is reached, then freeze it", "pruning"),
    _opt("soft_hw", TRISTATE, None, "add the hardware loss (default: on in rate_prune/harp_prune)", "pruning"),
    _opt("scaled_score_init", TRISTATE, None, "scores = sqrt(6/fan_in)*W/max|W| (default: on in *_prune modes)", "pruning"),
    _opt("rate_stg_init", TRISTATE, None, "rate logits from --stg_id (default: on in rate/harp modes; else uniform at --k)", "pruning"),
    _opt("scores_init_type", str, None, "random score init when scaled init is off (default: PyTorch's layer init)", "pruning",
         choices=("kaiming_normal", "kaiming_uniform", "xavier_uniform", "xavier_normal")),
    _opt("freeze_bn", FLAG, False, "freeze BatchNorm affine parameters in modes that freeze the weights", "pruning"),
    _opt("conv_k", FLOATS, None, "not supported: per-layer rates come from --stg_id", "pruning"),
    _opt("shortcut_k", FLOATS, None, "not supported: per-layer rates come from --stg_id", "pruning"),
    _opt("fc_k", FLOATS, None, "not supported: per-layer rates come from --stg_id", "pruning"),
    # --- data
    _opt("dataset", str, "digits", "dataset", "data", choices=DATASETS),
    _opt("data_dir", str, "./datasets", "where the dataset files are (torchvision layout)", "data"),
    _opt("download", FLAG, False, "download CIFAR10/CIFAR100/SVHN/MNIST into --data-dir if missing", "data"),
    _opt("batch_size", int, 128, "training batch size (global, across all processes)", "data", check=_positive, check_text="> 0"),
    _opt("test_batch_size", int, 128, "evaluation batch size", "data", check=_positive, check_text="> 0"),
    _opt("normalize", FLAG, False, "normalise inputs inside the model with the dataset mean/std", "data"),
    _opt("mean", FLOATS, None, "per-channel mean for --normalize (default: the dataset's)", "data"),
    _opt("std", FLOATS, None, "per-channel std for --normalize (default: the dataset's)", "data"),
    _opt("data_fraction", float, 1.0, "random fraction of the training set to use", "data",
         check=lambda v: 0 < v <= 1, check_text="in (0, 1]"),
    _opt("val_split", float, 0.0, "hold out this fraction of the training set for model selection (0: select on the test set, as the original)", "data",
         check=lambda v: 0 <= v < 1, check_text="in [0, 1)"),
    _opt("image_dim", int, None, "ImageNet crop size in pixels (default 224)", "data", check=_positive, check_text="> 0"),
    _opt("workers", int, None, "DataLoader worker processes for ImageNet (default min(8, CPUs))", "data", check=_non_negative, check_text=">= 0"),
    # --- training
    _opt("trainer", str, "adv", "training loop: base (natural), adv (adversarial, see --adv-loss), freeadv (Free-AT)", "training",
         choices=("base", "adv", "freeadv")),
    _opt("adv_loss", str, "pgd", "adversarial training objective", "training", choices=("pgd", "trades", "mart", "nat")),
    _opt("epochs", int, 100, "training epochs (Free-AT: each epoch replays every batch --n-repeats times)", "training",
         check=_positive, check_text=">= 1", scope="train"),
    _opt("optimizer", str, "sgd", "optimizer over all trainable parameters", "training", choices=("sgd", "adam", "rmsprop"), scope="train"),
    _opt("lr", float, 0.1, "learning rate", "training", check=_positive, check_text="> 0", scope="train"),
    _opt("wd", float, 1e-4, "weight decay (applied to scores and rate logits too, as the original)", "training",
         check=_non_negative, check_text=">= 0", scope="train"),
    _opt("momentum", float, 0.9, "SGD momentum", "training", check=lambda v: 0 <= v < 1, check_text="in [0, 1)", scope="train"),
    _opt("lr_schedule", str, "cosine", "per-epoch learning-rate schedule", "training", choices=("cosine", "step", "constant"), scope="train"),
    _opt("warmup_epochs", int, 0, "epochs at --warmup-lr with --warmup-loss before the schedule starts", "training",
         check=_non_negative, check_text=">= 0", scope="train"),
    _opt("warmup_lr", float, 0.1, "learning rate during warm-up", "training", check=_positive, check_text="> 0", scope="train"),
    _opt("warmup_loss", str, "nat", "objective during warm-up", "training", choices=("nat", "fgsm", "pgd", "trades"), scope="train"),
    _opt("n_repeats", int, 4, "Free-AT replays per batch", "training", check=_positive, check_text=">= 1", scope="train"),
    _opt("val_method", str, "adv", "per-epoch validation: base (natural only) or adv/freeadv (natural + --attack_eval)", "training",
         choices=("base", "adv", "freeadv")),
    _opt("attack_eval", str, "pgd", "attack used by per-epoch validation", "training", choices=("pgd", "fgsm", "cw"), scope="train"),
    _opt("val_every", int, 1, "validate every N epochs (and always after the last)", "training", check=_positive, check_text=">= 1", scope="train"),
    # --- threat model (training, validation and the default of test.py)
    _opt("epsilon", float, 8 / 255, "perturbation budget", "attack", check=_non_negative, check_text=">= 0"),
    _opt("num_steps", int, 10, "PGD steps in training and validation", "attack", check=_non_negative, check_text=">= 0"),
    _opt("step_size", float, 2 / 255, "PGD step size", "attack", check=_non_negative, check_text=">= 0"),
    _opt("clip_min", float, 0.0, "lower pixel bound", "attack"),
    _opt("clip_max", float, 1.0, "upper pixel bound", "attack"),
    _opt("distance", str, "l_inf", "threat model norm", "attack", choices=("l_inf", "l_2")),
    _opt("const_init", FLAG, False, "no random start in validation attacks (the original's behaviour of this flag)", "attack"),
    _opt("beta", float, 6.0, "TRADES/MART robust-loss weight (presets: 6 for TRADES, 5 for MART)", "attack", check=_non_negative, check_text=">= 0"),
    # --- runtime
    _opt("device", str, "auto", "auto, cpu, cuda or cuda:N", "runtime"),
    _opt("gpu", str, None, "original-style GPU id list; the first id selects cuda:N (use torchrun for several GPUs)", "runtime"),
    _opt("no_cuda", FLAG, False, "run on the CPU even if a GPU is present", "runtime"),
    _opt("print_freq", int, 10, "batches between progress-bar metric refreshes", "runtime", check=_positive, check_text=">= 1"),
    _opt("no_progress", FLAG, False, "no progress bars (they are also off when stderr is not a terminal)", "runtime"),
    _opt("bf16", FLAG, False, "bf16 autocast for training steps (evaluation stays fp32)", "runtime", scope="train"),
    _opt("channels_last", FLAG, False, "channels_last memory format for training", "runtime", scope="train"),
    _opt("compile", FLAG, False, "torch.compile the model for training", "runtime", scope="train"),
    # --- evaluation (test.py)
    _opt("attacks", str, "all", "comma-separated attacks: " + ", ".join(ATTACK_NAMES) + " (or 'all')", "evaluation", scope="test"),
    _opt("attack_preset", str, "standard", "standard: official AutoAttack settings; original: the HARP paper's torchattacks defaults", "evaluation",
         choices=("standard", "original"), scope="test"),
    _opt("n_examples", int, None, "evaluate the first N test examples (default: all)", "evaluation", check=_positive, check_text="> 0", scope="test"),
    _opt("checkpoint", str, "best", "which checkpoint of the run to evaluate", "evaluation", choices=("best", "last", "best_dense", "last_dense"), scope="test"),
    _opt("results_file", str, None, "also write the result JSON here", "evaluation", scope="test"),
    _opt("eval_batch_size", int, None, "batch size of the attacks (default: --test-batch-size; AutoAttack on a GPU: 1000 "
         "survivors per batch)", "evaluation", check=_positive, check_text="> 0", scope="test"),
    _opt("epsilons", str, None, "comma-separated budgets for a security curve: PGD (--num-steps steps, step size "
         "eps * step_size/epsilon) at each, stored as security_curve in the result JSON", "evaluation", scope="test"),
)

OPTION_BY_NAME = {o.name: o for o in OPTIONS}

Config = dataclasses.make_dataclass(
    "Config", [(o.name, Any, dataclasses.field(default=o.default)) for o in OPTIONS], frozen=True)
Config.__doc__ = "The resolved settings of one run (fields: configs.schema.OPTIONS)."


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def coerce_value(name: str, value: Any, source: str) -> Any:
    """Convert a YAML or CLI value to the option's type, match choices, and range-check it."""
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
    if opt.choices is not None:
        value = match_choice(name, value, opt.choices, source)
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
