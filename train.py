"""Train one stage: pretrain, a prune mode (score/rate/harp) or a finetune mode (score/rate/harp/lwm).

    python train.py --arch vgg16_bn --dataset CIFAR10 --exp-mode pretrain --adv_loss pgd --epochs 100

The stage's recipe (configs/recipes.py) says what it does; stage.py builds it; this file runs the epochs and owns
the run directory (fresh start, automatic resume, or refusal to overwrite, as utils/run_dir.py decides).
"""
import dataclasses
import logging
import math
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

import torch
import yaml

from configs.cli import describe_overrides, resolve_config
from configs.errors import UserError
from configs.recipes import BEST_ONCE_TARGET_MET, RATES, RECIPES, effective_recipe
from configs.schema import config_to_dict
from pruning.budget import CostModel, describe_budget
from pruning.wrap import dense_state_dict, freeze_masks, masked_layers, sparsity_report
from stage import (Source, build_stage, build_stage_model, load_checkpoint_into, load_data, option_choices,
                   recipe_source)
from strategies import parse_strategy_id
from strategies.files import keep_rates_from_sparsity, save_strategies, split_file_strategy
from trainers.attacks.threat import threat_from_config
from trainers.evaluation.scoring import accuracies
from trainers.evaluation.validation import validate, validation_options
from utils.checkpoint import FORMAT_VERSION, load_checkpoint, save_atomic
from utils.device import resolve_device
from utils.distributed import DistContext, all_reduce_sums, barrier, broadcast_flag, init_distributed, shutdown
from utils.logging import buffer_logging, setup_logging, write_jsonl
from utils.run_dir import checkpoint_path, finished_with_same_settings, plan_run, run_dir
from utils.schedules import lr_at_epoch
from utils.seed import epoch_seed, rng_state, seed_everything
from utils.tensorboard_log import EpochScalars
from utils.versions import versions

log = logging.getLogger("train")


class Run:
    """Everything one training run holds between epochs."""

    def __init__(self, cfg, sources, ctx: DistContext = DistContext(), device: torch.device = None):
        self.cfg, self.sources, self.ctx = cfg, sources, ctx
        self.recipe = effective_recipe(RECIPES[cfg.exp_mode], cfg)
        self.device = device or resolve_device(cfg.device, cfg.gpu, cfg.no_cuda)
        self.directory = run_dir(cfg)
        if cfg.batch_size % ctx.world_size:
            raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {ctx.world_size} processes")
        self.local_batch = cfg.batch_size // ctx.world_size  # --batch-size is the global batch
        if self.recipe.masked and split_file_strategy(cfg.stg_id) is None:  # a strategy file is read with the model
            parse_strategy_id(cfg.stg_id)  # names the experiment in every masked mode: reject typos early
        self.total_epochs = cfg.epochs + cfg.warmup_epochs
        self.history: List[Dict] = []
        self.best = -math.inf
        self.best_rank = 0  # how well the best checkpoint meets its target (_target_rank); a better rank always wins
        self.cost_model: Optional[CostModel] = None
        self.start_epoch = 0
        self.threat = threat_from_config(cfg)                                   # training attacks
        self.validation_threat = threat_from_config(cfg, random_start=not cfg.const_init)
        # each epoch's record mirrored as TensorBoard scalars (rank 0); a missing package fails here, at set-up
        mirrored = cfg.tensorboard and ctx.is_main and not cfg.evaluate
        self.scalars = EpochScalars(os.path.join(self.directory, "tensorboard")) if mirrored else None

    # -- set-up
    def setup(self, resume_ckpt: Optional[Dict]) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.data = load_data(cfg, self.device)
        info = self.data.info
        self.cfg = cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes or info.num_classes)
        log.info("data: %s, %d train / %d %s examples, %d classes", info.name, self.data.num_train,
                 self.data.num_val or self.data.num_test, "validation" if self.data.num_val else "test",
                 cfg.num_classes)
        if cfg.evaluate:
            self.model, _ = build_stage_model(cfg, self.recipe, info, self.device)
            self._load_for_evaluation()
            return
        if resume_ckpt is None:
            stage = build_stage(cfg, info, self.device, self.threat,
                                source=recipe_source(cfg, self.recipe, self.device))
        else:
            resume = Source(resume_ckpt, cfg.resume or checkpoint_path(self.directory, "last"))
            stage = build_stage(cfg, info, self.device, self.threat, resume=resume)
            self._restore_progress(resume_ckpt)
        self.model, self.parts, self.cost_model = stage.model, stage.parts, stage.cost_model
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.ctx.enabled and self.device.type == "cuda":
            # BN statistics over the global batch, as one process would compute them (SyncBatchNorm is GPU-only)
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        self.train_model, self.attack_model = self.model, self.model
        if self.ctx.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if cfg.compile:
            self.train_model, self.attack_model = torch.compile(self.train_model), torch.compile(self.model)
        if self.recipe.masked:
            report = sparsity_report(self.model)
            log.info("kept %d of %d prunable weights (%.4f%%), target k = %g", report["kept"], report["total"],
                     100 * report["global_keep"], cfg.k)

    def _load_for_evaluation(self) -> None:
        path = self.cfg.source_net or checkpoint_path(self.directory, "best")
        load_checkpoint_into(self.model, path, self.device, keep_pruning_state=True, k=self.cfg.k,
                             arch=self.cfg.arch, dataset=self.cfg.dataset)
        if self.recipe.masked:
            freeze_masks(self.model)
        log.info("evaluating %s", path)

    def _restore_progress(self, ckpt: Dict) -> None:
        """Where the interrupted run stopped: its epoch, best metric and history (stage.build_stage restores the
        weights, the optimizer and every stateful part)."""
        self.start_epoch = int(ckpt["epoch"])
        self.best = float(ckpt.get("best_prec1", -math.inf))
        self.best_rank = int(ckpt.get("best_rank", 0))
        self.history = list(ckpt.get("history", []))
        log.info("resuming %s after epoch %d of %d", self.cfg.resume or checkpoint_path(self.directory, "last"),
                 self.start_epoch, self.total_epochs)

    # -- per epoch
    def validate(self, epoch_label: str) -> Dict[str, float]:
        cfg = self.cfg
        on_val = self.data.num_val > 0
        shard = dict(rank=self.ctx.rank, world_size=self.ctx.world_size)
        batches = (self.data.val_batches(cfg.test_batch_size, **shard) if on_val
                   else self.data.test_batches(cfg.test_batch_size, **shard))
        sums = validate(self.model, batches, **validation_options(cfg), threat=self.validation_threat,
                        num_batches=self.data.num_batches("val" if on_val else "test", cfg.test_batch_size,
                                                          world_size=self.ctx.world_size),
                        desc=f"{epoch_label} validate", show_progress=self.show_progress)
        return accuracies(all_reduce_sums(sums, self.ctx, self.device))

    @property
    def show_progress(self) -> bool:
        return not self.cfg.no_progress and self.ctx.is_main

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        cfg = self.cfg
        batches = self.data.train_batches(self.local_batch, epoch=epoch, seed=cfg.seed, rank=self.ctx.rank,
                                          world_size=self.ctx.world_size)
        stats = self.parts.loop.train_epoch(
            self.train_model, self.attack_model, batches, self.parts.optimizer, epoch=epoch,
            num_batches=self.data.num_batches("train", self.local_batch, world_size=self.ctx.world_size),
            device=self.device, regularizers=list(self.parts.regularizers.values()), bf16=cfg.bf16,
            channels_last=cfg.channels_last, print_freq=cfg.print_freq, show_progress=self.show_progress)
        return self._reduce_train_stats(stats)

    def _reduce_train_stats(self, stats: Dict[str, float]) -> Dict[str, float]:
        """Example-weighted averages over all processes; regularizer means averaged over processes."""
        if not self.ctx.enabled:
            return stats
        n = stats["train_examples"]
        means = [k for k in stats if k.endswith("_mean")]
        sums = {"n": n, "loss": stats["train_loss"] * n, "acc": stats["train_acc"] * n, **{k: stats[k] for k in means}}
        total = all_reduce_sums(sums, self.ctx, self.device)
        out = {"train_loss": total["loss"] / total["n"], "train_acc": total["acc"] / total["n"],
               "train_examples": int(total["n"])}
        out.update({k: total[k] / self.ctx.world_size for k in means})
        return out

    @property
    def selection_metric(self) -> str:
        """Best checkpoint by robust validation accuracy, or natural accuracy for natural training."""
        natural = self.cfg.adv_loss == "nat" or self.cfg.val_method == "base"
        return "natural_acc" if natural else "robust_acc"

    def run_epochs(self) -> None:
        cfg = self.cfg
        if cfg.lr_schedule == "cosine" and cfg.epochs == 1:
            log.warning("--epochs 1 with the original's cosine schedule gives lr 0 (it evaluates at epoch e-1); "
                        "use --lr-schedule constant or more epochs to actually train")
        if self.start_epoch == 0 and self.recipe.masked and cfg.dataset != "imagenet":
            start = self.validate("start")
            log.info("before training: %s", ", ".join(f"{k} {v:.2f}" for k, v in start.items()))
        for epoch in range(self.start_epoch, self.total_epochs):
            seed_everything(epoch_seed(cfg.seed, epoch) + self.ctx.rank)  # distinct attack noise per process
            lr = lr_at_epoch(epoch, lr=cfg.lr, epochs=cfg.epochs, schedule=cfg.lr_schedule,
                             warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr)
            for group in self.parts.optimizer.param_groups:
                group["lr"] = lr
            started = time.time()
            record = {"epoch": epoch + 1, "lr": lr}
            for hook in self.parts.hooks.values():
                record.update(hook.before_epoch(epoch))
            record.update(self.train_epoch(epoch))
            last = epoch + 1 == self.total_epochs
            validated = (epoch + 1) % cfg.val_every == 0 or last
            if validated:
                record.update(self.validate(f"epoch {epoch + 1}"))
            if self.recipe.masked:
                report = sparsity_report(self.model)
                record["keep"] = report["global_keep"]
                record["per_layer_keep"] = {n: v["keep"] for n, v in report["per_layer"].items()}
                record["budget"] = self.cost_model.budget()
            for regularizer in self.parts.regularizers.values():
                record.update(regularizer.measure())
            for hook in self.parts.hooks.values():
                hook.after_epoch(epoch, record)
            rank = self._target_rank(record) if validated else 0
            metric = record.get(self.selection_metric)
            is_best = rank > 0 and metric is not None and (rank, metric) > (self.best_rank, self.best)
            if is_best:
                self.best, self.best_rank = metric, rank
            record.update(is_best=is_best, seconds=round(time.time() - started, 3))
            self.history.append(record)
            if self.ctx.is_main:
                self.save(epoch + 1, is_best, finished=last)
            if self.scalars is not None:
                self.scalars.write(record)
            barrier(self.ctx)
            log.info(_epoch_line(record))
            if "per_layer_keep" in record:
                log.info("per-layer keep: %s", ", ".join(f"{n}={v:.4f}" for n, v in record["per_layer_keep"].items()))

    def _target_rank(self, record: Dict) -> int:
        """May this epoch become the best checkpoint, and how well does it meet its target? 0: not eligible
        (a target-gated recipe before its hardware target is met); 1: eligible but its masks are off target
        (more than TARGET_TOLERANCE away); 2: eligible and on target. An epoch on target beats any epoch off it,
        whatever their accuracies, so a model far sparser than asked is kept only when no epoch was on target."""
        if self.recipe.best_when == BEST_ONCE_TARGET_MET and not record.get("target_met", True):
            return 0
        return 2 if record.get("budget", {}).get("on_target", True) else 1

    # -- checkpoints
    def checkpoint_dict(self, epoch: int, finished: bool) -> Dict:
        ckpt = {"format_version": FORMAT_VERSION, "epoch": epoch, "arch": self.cfg.arch,
                "exp_mode": self.cfg.exp_mode, "dataset": self.cfg.dataset, "state_dict": self.model.state_dict(),
                "best_prec1": self.best, "best_rank": self.best_rank, "optimizer": self.parts.optimizer.state_dict(),
                "rng": rng_state(), "config": config_to_dict(self.cfg), "history": self.history,
                "finished": finished, "sparsity": sparsity_report(self.model) if self.recipe.masked else None,
                "budget": self.cost_model.budget() if self.cost_model is not None else None,
                "versions": versions()}
        for key, part in self.parts.stateful().items():  # gamma, the Free-AT perturbation, a new method's state
            if key in ckpt:
                raise ValueError(f"training state key {key!r} collides with a checkpoint entry")
            ckpt[key] = part.state_dict()
        return ckpt

    def save(self, epoch: int, is_best: bool, finished: bool) -> None:
        ckpt = self.checkpoint_dict(epoch, finished)
        save_atomic(ckpt, checkpoint_path(self.directory, "last"))
        if is_best:
            save_atomic(ckpt, checkpoint_path(self.directory, "best"))
        if self.cfg.save_dense and self.recipe.masked:
            dense = {k: v for k, v in ckpt.items() if k not in ("optimizer", "rng", *self.parts.stateful())}
            dense["state_dict"] = dense_state_dict(self.model)
            save_atomic(dense, checkpoint_path(self.directory, "last_dense"))
            if is_best:
                save_atomic(dense, checkpoint_path(self.directory, "best_dense"))
        write_jsonl(os.path.join(self.directory, "metrics.jsonl"), self.history)

    def warn_if_at_chance(self) -> None:
        """A run whose best natural accuracy is at chance level learned nothing: say so (e.g. a channel k so small
        that a layer keeps fewer channels than there are classes)."""
        accuracies = [r["natural_acc"] for r in self.history if "natural_acc" in r]
        chance = 100.0 / self.cfg.num_classes
        if accuracies and max(accuracies) <= 1.5 * chance:
            log.warning("the best natural accuracy of this run, %.2f%%, is at chance level (%.1f%% for %d classes): "
                        "the model learned nothing useful%s", max(accuracies), chance, self.cfg.num_classes,
                        "; with --prune_reg channel, k is the kept fraction of channels per layer (FLOPs about k^2): "
                        "try a larger --k" if self.recipe.masked and self.cfg.prune_reg == "channel" else "")

    def export_strategy(self) -> str:
        """Write the best checkpoint's kept fraction per layer as a strategy file in the run directory (a run whose
        recipe learns rates, e.g. HARP), so `--stg_id <file>:<exp_mode>` starts another run, e.g. Hydra, from it."""
        rates = keep_rates_from_sparsity(load_checkpoint(checkpoint_path(self.directory, "best"))["sparsity"])
        path = save_strategies(os.path.join(self.directory, "strategy.yaml"), {self.cfg.exp_mode: rates},
                               arch=self.cfg.arch, granularity=self.cfg.prune_reg,
                               layer_names=[name for name, _ in masked_layers(self.model)], overwrite=True)
        log.info("learned per-layer keep rates: --stg_id %s:%s", path, self.cfg.exp_mode)
        return str(path)

    def check_target_reached(self) -> None:
        """A run whose best checkpoint needs the hardware target, and never reached it, has nothing to finetune."""
        if self.recipe.best_when != BEST_ONCE_TARGET_MET or any(r.get("target_met") for r in self.history):
            return
        final = self.history[-1]
        raise UserError(f"k = {self.cfg.k} never reached in {self.cfg.epochs} epochs (soft cost "
                        f"{final.get('soft_cost', float('nan')):.4f}, hw loss {final.get('hw_loss', float('nan')):.4f}): "
                        "no model_best.pth.tar to finetune; rerun with --overwrite and a larger --gamma or more --epochs")

    def budget_warning(self) -> Optional[str]:
        """One line when the model this run hands on (its best checkpoint) is more than TARGET_TOLERANCE away from
        the target it was asked for: both numbers and what to change; None when it is on target."""
        best = next((r for r in reversed(self.history) if r.get("is_best")), None)
        budget = (best or {}).get("budget")
        if budget is None or budget["on_target"]:
            return None
        return (f"off target: the best checkpoint (epoch {best['epoch']}) {describe_budget(budget)} (--k {self.cfg.k}, "
                f"{self.cfg.prune_reg}); {self._budget_advice(budget)}")

    def _budget_advice(self, budget: Dict) -> str:
        below = budget["reached"] < budget["target"]
        if "hardware" in self.recipe.regularizers:
            if not below:
                return "rerun with --overwrite and a larger --gamma or more --epochs"
            if not self.cfg.target_floor:
                return "rerun with --overwrite and --target-floor (or a smaller --gamma)"
        if self.recipe.freeze_masks and self.recipe.starts_from:
            return f"its masks come from the {self.recipe.starts_from} run, which is off target too"
        return ("whole weights or channels per layer cannot meet it at this k (each layer keeps at least one "
                "channel, and k_min = alpha * k): choose another --k or --prune_reg weight")


def _epoch_line(record: Dict) -> str:
    parts = [f"epoch {record['epoch']}", f"lr {record['lr']:.6g}", f"loss {record['train_loss']:.4f}"]
    for key, label in (("natural_acc", "nat"), ("robust_acc", "rob")):
        if key in record:
            parts.append(f"{label} {record[key]:.2f}%")
    if "keep" in record:
        parts.append(f"keep {100 * record['keep']:.4f}%")
    if "hw_loss" in record:
        parts.append(f"hw {record['hw_loss']:.4f} gamma {record['gamma']:g}")
    parts.append("best" if record["is_best"] else "")
    parts.append(f"({record['seconds']:.1f}s)")
    return "  ".join(p for p in parts if p)


def plan_on_all_ranks(cfg, directory: str, ctx: DistContext, device: torch.device) -> Optional[Dict]:
    """Rank 0 decides; the others follow its decision."""
    error, ckpt = None, None
    if ctx.is_main:
        try:
            ckpt = plan_run(cfg, directory)
        except UserError as err:
            error = err
    if broadcast_flag(error is not None, ctx, device):
        raise error or UserError("rank 0 refused to start this run")
    if not ctx.is_main:
        ckpt = plan_run(cfg, directory)
    return ckpt


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ctx, run = DistContext(), None
    try:
        cfg, sources = resolve_config(argv, "train", "train.py", choices=option_choices())
        buffer_logging(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
        ctx, device = init_distributed(os.environ, resolve_device(cfg.device, cfg.gpu, cfg.no_cuda))
        run = Run(cfg, sources, ctx, device)
        log.info("run directory: %s%s", run.directory, f" ({ctx.world_size} processes)" if ctx.enabled else "")
        for line in describe_overrides(sources, cfg):
            log.debug("config: %s", line)
        if cfg.skip_finished and not (cfg.evaluate or cfg.overwrite) and finished_with_same_settings(cfg, run.directory):
            print(f"train.py: {run.directory} already holds this finished run; skipped (--skip-finished)",
                  file=sys.stderr)
            return 0
        resume_ckpt = None if cfg.evaluate else plan_on_all_ranks(cfg, run.directory, ctx, run.device)
        run.setup(resume_ckpt)  # everything that can fail on bad input fails here, before anything is written
        writes = ctx.is_main and not cfg.evaluate
        if writes:
            if cfg.overwrite and resume_ckpt is None and os.path.isdir(run.directory):
                shutil.rmtree(run.directory)
                log.info("--overwrite: removed the previous run")
            os.makedirs(run.directory, exist_ok=True)
        barrier(ctx)
        setup_logging(os.path.join(run.directory, "train.log") if writes else None,
                      level=logging.INFO if ctx.is_main else logging.WARNING)
        if cfg.evaluate:
            result = run.validate("evaluate")
            log.info("evaluation: %s", ", ".join(f"{k} {v:.2f}" for k, v in result.items()))
            return 0
        if writes:
            with open(os.path.join(run.directory, "config.yaml"), "w") as fh:
                yaml.safe_dump(config_to_dict(run.cfg), fh, sort_keys=True)
        run.run_epochs()
        if run.scalars is not None:
            run.scalars.close()
        run.warn_if_at_chance()
        run.check_target_reached()
        if writes and RATES in run.recipe.trains:
            run.export_strategy()
        log.info("done: %s (best %s %.2f%%)", checkpoint_path(run.directory, "best"), run.selection_metric, run.best)
        warning = run.budget_warning()
        if warning:
            log.warning("%s", warning)  # the last line a user sees: a model off its target is not the one asked for
        return 0
    except UserError as err:
        where = f"[rank {ctx.rank}] " if ctx.enabled and not ctx.is_main else ""  # a rank-local problem must show
        print(f"train.py: error: {where}{err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        setup_logging(None)
        done = run.history[-1]["epoch"] if run is not None and run.history else 0
        print(f"train.py: interrupted after epoch {done}; rerun the same command to resume", file=sys.stderr)
        raise
    except BaseException:
        setup_logging(None)  # a bug: show what was logged before the traceback
        raise
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # main() said where it stopped; no traceback for Ctrl-C
        sys.exit(130)
