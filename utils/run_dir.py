"""The deterministic run-directory layout that lets stages find each other without paths (DESIGN.md §6).

  <result_dir>/<arch>/<dataset>/[normalize/]<objective>/pretrain/                       pretrain
  <result_dir>/<arch>/<dataset>/[normalize/]<objective>/<dataset>_<prune_reg>_<stg_id>_<k>/<exp_mode>/

<objective> is the adversarial loss (pgd, trades, mart), `nat` for natural training and `freeadv` for
Free-AT. `--exp-name` replaces the `pretrain` / `<dataset>_<prune_reg>_<stg_id>_<k>` component of the
current stage (and of the prune stage a finetune reads from). Inside a run directory:

  config.yaml  train.log  metrics.jsonl  checkpoint/{checkpoint,model_best}[_dense].pth.tar  eval/
"""
import os
from typing import Optional

from configs.modes import MODES


def objective_component(cfg) -> str:
    if cfg.trainer == "freeadv":
        return "freeadv"
    if cfg.trainer == "base" or cfg.adv_loss == "nat":
        return "nat"
    return cfg.adv_loss


def experiment_root(cfg) -> str:
    parts = [cfg.result_dir, cfg.arch, cfg.dataset] + (["normalize"] if cfg.normalize else []) + [objective_component(cfg)]
    return os.path.join(*parts)


def default_exp_name(cfg, mode: str) -> str:
    if mode == "pretrain":
        return "pretrain"
    return f"{cfg.dataset.lower()}_{cfg.prune_reg}_{cfg.stg_id}_{cfg.k}"


def run_dir(cfg, mode: Optional[str] = None, exp_name: Optional[str] = None) -> str:
    """Directory of `mode`'s run for this configuration (default: the configured mode and --exp-name)."""
    mode = mode or cfg.exp_mode
    if exp_name is None and mode == cfg.exp_mode:
        exp_name = cfg.exp_name
    name = exp_name or default_exp_name(cfg, mode)
    root = experiment_root(cfg)
    return os.path.join(root, name) if mode == "pretrain" else os.path.join(root, name, mode)


def checkpoint_path(directory: str, which: str = "best") -> str:
    """which: best, last, best_dense or last_dense."""
    stem = {"best": "model_best", "last": "checkpoint", "best_dense": "model_best_dense",
            "last_dense": "checkpoint_dense"}[which]
    return os.path.join(directory, "checkpoint", f"{stem}.pth.tar")


def source_checkpoint(cfg) -> Optional[str]:
    """Where this stage starts from: --source-net, else the previous stage's best checkpoint.

    A finetune with --scaled-score-init starts from the pretrained net (Hydra's LWM baseline: magnitude
    masks without a prune stage). Pretrain has no source.
    """
    if cfg.source_net:
        return cfg.source_net
    spec = MODES[cfg.exp_mode]
    if spec.source_mode is None:
        return None
    if spec.stage == "finetune" and cfg.scaled_score_init:
        return checkpoint_path(run_dir(cfg, "pretrain", exp_name="pretrain"))
    exp_name = "pretrain" if spec.source_mode == "pretrain" else cfg.exp_name
    return checkpoint_path(run_dir(cfg, spec.source_mode, exp_name=exp_name))
