"""The deterministic run-directory layout that lets stages find each other without paths (README, Stage chaining and the run layout), and the
decisions tied to it: where a stage's source checkpoint is, whether a run starts, resumes or is refused.

  <result_dir>/<arch>/<dataset>/[normalize/]<objective>/pretrain/                       pretrain
  <result_dir>/<arch>/<dataset>/[normalize/]<objective>/<dataset>_<prune_reg>_<stg_id>_<k>/<exp_mode>/

<objective> is the adversarial loss (pgd, trades, mart), `nat` for natural training, `freeadv` for
Free-AT, `fast` for Fast-AT, `smooth` / `gaussian` for randomized smoothing (--smooth-loss kl / gaussian),
`crown-ibp` and `mixtrain`.
`--exp-name` replaces the `pretrain` / `<dataset>_<prune_reg>_<stg_id>_<k>` component of the current stage
(and of the prune stage a finetune reads from). Inside a run directory:

  config.yaml  train.log  metrics.jsonl  checkpoint/{checkpoint,model_best}[_dense].pth.tar  eval/
"""
import os
from typing import Dict, List, Optional

from configs.errors import UserError
from configs.recipes import RECIPES
from configs.schema import OPTION_BY_NAME, config_to_dict
from utils.checkpoint import load_checkpoint

CHECKPOINT_STEMS = {"best": "model_best", "last": "checkpoint", "best_dense": "model_best_dense",
                    "last_dense": "checkpoint_dense"}
_CHECKPOINT_SUFFIXES = (".pth.tar", ".pth", ".pt", ".tar", ".ckpt")
# Options that do not change what a run computes: a rerun may differ in these and still resume.
RUNTIME_OPTIONS = {"configs", "data_dir", "download", "workers", "device", "gpu", "no_cuda", "print_freq",
                   "no_progress", "resume", "overwrite", "skip_finished", "source_net", "evaluate", "compile",
                   "tensorboard"}


def objective_component(cfg) -> str:
    if cfg.trainer in ("freeadv", "fast"):  # Free-AT, Fast-AT: their own objectives
        return cfg.trainer
    if cfg.trainer == "smooth":  # randomized smoothing: Hydra's KL loss, or Gaussian augmentation
        return "smooth" if cfg.smooth_loss == "kl" else "gaussian"
    if cfg.trainer in ("crown-ibp", "mixtrain"):  # the verifiable objectives
        return cfg.trainer
    if cfg.trainer == "base" or cfg.adv_loss == "nat":
        return "nat"
    return cfg.adv_loss


def experiment_root(cfg) -> str:
    parts = [cfg.result_dir, cfg.arch, cfg.dataset] + (["normalize"] if cfg.normalize else []) + [objective_component(cfg)]
    return os.path.join(*parts)


def default_exp_name(cfg, mode: str) -> str:
    if RECIPES[mode].shares_pretrain_name:
        return "pretrain"
    return f"{cfg.dataset.lower()}_{cfg.prune_reg}_{strategy_label(cfg.stg_id)}_{cfg.k}"


def strategy_label(stg_id: str) -> str:
    """The --stg_id part of a run name: a built-in id as it is; a strategy file `DIR/NAME.yaml:ID` as `NAME-ID`
    (`NAME` for a file named without an id), so the name holds neither '/' nor ':'."""
    path, colon, file_id = stg_id.rpartition(":")
    stem = os.path.splitext(os.path.basename(path if colon else stg_id))[0]
    return f"{stem}-{file_id}" if colon else stem


def run_dir(cfg, mode: Optional[str] = None, exp_name: Optional[str] = None) -> str:
    """Directory of `mode`'s run for this configuration (default: the configured mode and --exp-name)."""
    mode = mode or cfg.exp_mode
    if exp_name is None and mode == cfg.exp_mode:
        exp_name = cfg.exp_name
    name = exp_name or default_exp_name(cfg, mode)
    root = experiment_root(cfg)
    return os.path.join(root, name) if RECIPES[mode].shares_pretrain_name else os.path.join(root, name, mode)


def checkpoint_path(directory: str, which: str = "best") -> str:
    """which: best, last, best_dense or last_dense."""
    return os.path.join(directory, "checkpoint", f"{CHECKPOINT_STEMS[which]}.pth.tar")


def source_checkpoint(cfg) -> Optional[str]:
    """Where this stage starts from: --source-net, else the best checkpoint of the mode its recipe starts from
    (a pretrain run is shared by every name; a later stage reads the run of the same --exp-name)."""
    if cfg.source_net:
        return cfg.source_net
    source_mode = RECIPES[cfg.exp_mode].starts_from
    if source_mode is None:
        return None
    exp_name = "pretrain" if RECIPES[source_mode].shares_pretrain_name else cfg.exp_name
    return checkpoint_path(run_dir(cfg, source_mode, exp_name=exp_name))


# ----------------------------------------------------------------------------------------------- evaluation
def evaluated_checkpoint(cfg) -> str:
    """The checkpoint test.py evaluates: --source-net, else the run's --checkpoint (best, last, *_dense)."""
    if cfg.source_net:
        if not os.path.isfile(cfg.source_net):
            raise UserError(f"checkpoint {cfg.source_net} (--source-net) does not exist")
        return cfg.source_net
    directory = run_dir(cfg)
    path = checkpoint_path(directory, cfg.checkpoint)
    if not os.path.isfile(path):
        others = [w for w in CHECKPOINT_STEMS
                  if w != cfg.checkpoint and os.path.isfile(checkpoint_path(directory, w))]
        hint = (f"; this run has --checkpoint {', '.join(others)}" if others else
                f"; train it first (python train.py with the same flags and --exp-mode {cfg.exp_mode}) "
                "or pass --source-net PATH")
        raise UserError(f"checkpoint {path} does not exist{hint}")
    return path


def eval_dir_for(path: str) -> str:
    """<run dir>/eval for a checkpoint in <run dir>/checkpoint/, else an eval/ folder beside the file."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) == "checkpoint":
        folder = os.path.dirname(folder)
    return os.path.join(folder, "eval")


def checkpoint_stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in _CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


# ----------------------------------------------------------------------------------------------- resume
def config_differences(stored: Dict, cfg) -> List[str]:
    """'key: old -> new' for every option that changes what a run computes."""
    diffs = []
    for key, value in config_to_dict(cfg).items():
        opt = OPTION_BY_NAME.get(key)
        if key in RUNTIME_OPTIONS or (opt is not None and opt.scope == "test") or value is None:
            continue  # None: derived during set-up (e.g. num_classes from the data)
        if key in stored and stored[key] != value:
            diffs.append(f"{key}: {stored[key]!r} -> {value!r}")
    return diffs


def finished_with_same_settings(cfg, directory: str) -> bool:
    """The run directory holds a finished run of exactly these settings with a best checkpoint (scripts rerun with
    --skip-finished). A run that ended without one (a hardware target never reached) gave nothing to build on."""
    last = checkpoint_path(directory, "last")
    if not (os.path.exists(last) and os.path.exists(checkpoint_path(directory, "best"))):
        return False
    ckpt = load_checkpoint(last)
    return bool(ckpt.get("finished")) and not config_differences(ckpt.get("config", {}), cfg)


def plan_run(cfg, directory: str) -> Optional[Dict]:
    """Decide before writing anything: None for a fresh start, or the checkpoint to resume from.

    Never overwrites: a finished run, or an unfinished one with different settings, is an error unless
    --overwrite is given (and then the entry point deletes the old run only once the new one has set up).
    """
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        if "optimizer" not in ckpt or "epoch" not in ckpt:
            raise UserError(f"--resume {cfg.resume}: not a training checkpoint (no optimizer state / epoch)")
        return ckpt
    last = checkpoint_path(directory, "last")
    if not os.path.exists(last) or cfg.overwrite:
        return None
    ckpt = load_checkpoint(last)
    if ckpt.get("finished"):
        raise UserError(f"{directory} already holds a finished run ({ckpt.get('epoch')} epochs); "
                        "pass --overwrite to replace it or --exp-name NAME for a separate run")
    diffs = config_differences(ckpt.get("config", {}), cfg)
    if diffs:
        raise UserError(f"{directory} holds an unfinished run with other settings ({'; '.join(diffs[:4])}); "
                        "rerun with the same settings to resume it, or pass --overwrite or --exp-name NAME")
    return ckpt
