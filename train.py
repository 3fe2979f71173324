"""Train one HARP stage: pretrain, {score,rate,harp}_prune or {score,rate,harp}_finetune.

    python train.py --arch vgg16_bn --dataset CIFAR10 --exp-mode pretrain --adv_loss pgd --epochs 100

This is the composition root: it turns the resolved config into data, a model, masks, an optimizer and
the epoch loop, and owns the run directory (fresh start, automatic resume, or refusal to overwrite).
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
from configs.modes import MODES, ModeSpec
from configs.schema import OPTION_BY_NAME, config_to_dict
from data import build_data
from models import create_model
from pruning.allocation import allocate_keep_rates
from pruning.budget import CostModel, GammaSchedule, target_met
from pruning.graph import inspect_layers
from pruning.init import init_scores_from_weights, init_scores_random, set_keep_rates, tie_rates
from pruning.trainable import set_trainable
from pruning.wrap import SCORE_KEY, RATE_KEY, dense_state_dict, freeze_masks, masked_layers, sparsify, sparsity_report
from strategies import parse_strategy_id, shipped_strategy
from trainers.attacks import ThreatModel, fgsm, pgd
from trainers.engine import FreePerturbation, train_one_epoch, train_one_epoch_free
from trainers.evaluate import accuracies, evaluate
from trainers.objectives import ObjectiveSettings, get_objective
from utils.checkpoint import FORMAT_VERSION, load_checkpoint, save_atomic, state_dict_of
from utils.device import resolve_device
from utils.distributed import DistContext, all_reduce_sums, barrier, broadcast_flag, init_distributed, shutdown
from utils.logging import buffer_logging, setup_logging, write_jsonl
from utils.run_dir import checkpoint_path, run_dir, source_checkpoint
from utils.schedules import lr_at_epoch
from utils.seed import epoch_seed, rng_state, seed_everything
from utils.versions import versions

log = logging.getLogger("train")

# Options that do not change what a run computes: a rerun may differ in these and still resume.
_RUNTIME_OPTIONS = {"configs", "data_dir", "download", "workers", "device", "gpu", "no_cuda", "print_freq",
                    "no_progress", "resume", "overwrite", "source_net", "evaluate", "compile"}


# ----------------------------------------------------------------------------- model construction
def build_model(cfg, info, device: torch.device) -> torch.nn.Module:
    """The dense architecture of `cfg`, masked unless the mode is pretrain (k_min = alpha * k)."""
    model = create_model(cfg.arch, num_classes=cfg.num_classes, in_channels=info.in_channels,
                         normalize=cfg.normalize, mean=cfg.mean or info.mean, std=cfg.std or info.std,
                         init_type=cfg.init_type).to(device)
    if MODES[cfg.exp_mode].masked:
        sparsify(model, cfg.prune_reg, keep_min=cfg.alpha * cfg.k)
    return model


def example_input(info, device) -> torch.Tensor:
    return torch.zeros(1, info.in_channels, info.image_size, info.image_size, device=device)


def load_weights(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: str, *,
                 drop_pruning_state: bool) -> List[str]:
    """Strictly load `state`; with `drop_pruning_state` the scores and rates of the checkpoint are ignored
    and the model's own are reported as missing. Returns the model keys the checkpoint did not provide."""
    if drop_pruning_state:
        state = {k: v for k, v in state.items() if k.rpartition(".")[2] not in (SCORE_KEY, RATE_KEY)}
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if unexpected:
        raise UserError(f"checkpoint {path} does not fit this model: unexpected keys {unexpected[:4]} "
                        f"(is it a {model.__class__.__name__} with the same --arch/--dataset/--prune_reg?)")
    bad_missing = [k for k in missing if k.rpartition(".")[2] not in (SCORE_KEY, RATE_KEY)]
    if bad_missing:
        raise UserError(f"checkpoint {path} does not fit this model: missing keys {bad_missing[:4]}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise UserError(f"checkpoint {path} does not fit this model: {key} has shape {tuple(value.shape)}, "
                            f"the model expects {tuple(own[key].shape)} (different --prune_reg or --num-classes?)")
    model.load_state_dict(state, strict=False)
    return missing


def check_checkpoint_config(ckpt: Dict, cfg, path: str) -> None:
    """A checkpoint of ours records its config: refuse one trained on another architecture or dataset."""
    stored = ckpt.get("config") or {}
    for key in ("arch", "dataset"):
        if stored.get(key) is not None and stored[key] != getattr(cfg, key):
            raise UserError(f"checkpoint {path} was trained with {key} {stored[key]}, not {getattr(cfg, key)}")


def initial_rates(cfg, model) -> Dict[str, float]:
    """Per-layer start rates: a shipped original list if there is one, else computed from the model."""
    density, rule = parse_strategy_id(cfg.stg_id)
    shipped = shipped_strategy(cfg.arch, cfg.prune_reg, cfg.stg_id)
    if shipped is not None:
        return shipped
    return allocate_keep_rates(rule, density, {name: layer.weight for name, layer in masked_layers(model)})


def init_pruning_state(cfg, model, spec: ModeSpec, have_scores: bool) -> None:
    """Scores and rate logits for a fresh prune run, or for a finetune whose source has none (LWM)."""
    if spec.stage == "finetune" and have_scores:
        return
    if spec.stage == "finetune" and not cfg.scaled_score_init:
        raise UserError("the source checkpoint has no pruning scores; finetune it with --scaled-score-init "
                        "(magnitude masks, Hydra's LWM baseline) or run a prune stage first")
    if cfg.scaled_score_init:
        init_scores_from_weights(model)
    elif cfg.scores_init_type:
        init_scores_random(model, cfg.scores_init_type)
    if cfg.rate_stg_init:
        rates = initial_rates(cfg, model)
        origin = cfg.stg_id
    else:
        rates = {name: cfg.k for name, _ in masked_layers(model)}
        origin = f"uniform k = {cfg.k}"
    raised = set_keep_rates(model, rates)
    if raised:
        log.warning("start rate at or below k_min = %g for %s; those layers start at k_min", cfg.alpha * cfg.k, raised)
    log.info("start keep rates (%s): %s", origin,
             ", ".join(f"{n}={float(l.keep_rate().detach()):.4f}" for n, l in masked_layers(model)))


# ----------------------------------------------------------------------------- run planning
def config_differences(stored: Dict, cfg) -> List[str]:
    current = config_to_dict(cfg)
    diffs = []
    for key, value in current.items():
        opt = OPTION_BY_NAME.get(key)
        if key in _RUNTIME_OPTIONS or (opt is not None and opt.scope == "test") or value is None:
            continue  # None: derived during set-up (e.g. num_classes from the data)
        if key in stored and stored[key] != value:
            diffs.append(f"{key}: {stored[key]!r} -> {value!r}")
    return diffs


def plan_run(cfg, directory: str) -> Optional[Dict]:
    """Decide before writing anything: None for a fresh start, or the checkpoint to resume from.

    Never overwrites: a finished run, or an unfinished one with different settings, is an error unless
    --overwrite is given (and then main deletes the old run only once the new one has set up).
    """
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        if "optimizer" not in ckpt or "epoch" not in ckpt:
            raise UserError(f"--resume {cfg.resume}: not a training checkpoint (no optimizer state / epoch)")
        return ckpt
    last = checkpoint_path(directory, "last")
    if not os.path.exists(last):
        return None
    if cfg.overwrite:
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


# ----------------------------------------------------------------------------- the loop
class Run:
    """Everything one training run holds between epochs."""

    def __init__(self, cfg, sources, ctx: DistContext = DistContext(), device: torch.device = None):
        self.cfg, self.sources, self.ctx = cfg, sources, ctx
        self.spec = MODES[cfg.exp_mode]
        self.device = device or resolve_device(cfg.device, cfg.gpu, cfg.no_cuda)
        self.directory = run_dir(cfg)
        if cfg.batch_size % ctx.world_size:
            raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {ctx.world_size} processes")
        self.local_batch = cfg.batch_size // ctx.world_size  # --batch-size is the global batch
        if self.spec.masked:
            parse_strategy_id(cfg.stg_id)  # names the experiment in every masked mode: reject typos early
        self.total_epochs = cfg.epochs + cfg.warmup_epochs
        self.history: List[Dict] = []
        self.best = -math.inf
        self.start_epoch = 0

    # -- set-up
    def setup(self, resume_ckpt: Optional[Dict]) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.data = build_data(cfg.dataset, data_dir=cfg.data_dir, data_fraction=cfg.data_fraction,
                               download=cfg.download, seed=cfg.seed, image_dim=cfg.image_dim, workers=cfg.workers,
                               val_split=cfg.val_split).to(self.device)
        info = self.data.info
        self.cfg = cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes or info.num_classes)
        log.info("data: %s, %d train / %d %s examples, %d classes", info.name, self.data.num_train,
                 self.data.num_val or self.data.num_test, "validation" if self.data.num_val else "test",
                 cfg.num_classes)
        self.model = build_model(cfg, info, self.device)
        self.cost_model = None
        if self.spec.masked:
            graph = inspect_layers(self.model, example_input(info, self.device))
            if cfg.prune_reg == "channel":
                ties = tie_rates(self.model, graph.tie_groups)
                if ties:
                    log.info("channel rates tied to the layer that shares their input: %s", ties)
            self.cost_model = CostModel(self.model, graph, cfg.prune_reg, cfg.k)
        if cfg.evaluate:
            self._load_for_evaluation()
        elif resume_ckpt is None:
            self._load_source()
        set_trainable(self.model, weights=self.spec.train_weights, scores=self.spec.train_scores,
                      rates=self.spec.train_rates, norm_layers=self.spec.train_weights or not cfg.freeze_bn)
        self.gamma = GammaSchedule(cfg.gamma, cfg.gamma_dynamic)
        self.perturbation = FreePerturbation(cfg.epsilon, cfg.clip_min, cfg.clip_max) if cfg.trainer == "freeadv" else None
        if resume_ckpt is not None:
            self._restore(resume_ckpt)
        if self.spec.stage == "finetune" and not cfg.evaluate:
            freeze_masks(self.model)
        if cfg.channels_last and not cfg.evaluate:
            self.model.to(memory_format=torch.channels_last)
        if self.ctx.enabled and self.device.type == "cuda" and not cfg.evaluate:
            # BN statistics over the global batch, as one process would compute them (SyncBatchNorm is GPU-only)
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self._optimizer(params)
        if resume_ckpt is not None:
            self.optimizer.load_state_dict(resume_ckpt["optimizer"])
        self.train_model, self.attack_model = self.model, self.model
        if self.ctx.enabled and not cfg.evaluate:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if cfg.compile and not cfg.evaluate:
            self.train_model, self.attack_model = torch.compile(self.train_model), torch.compile(self.model)
        if self.spec.masked:
            report = sparsity_report(self.model)
            log.info("kept %d of %d prunable weights (%.4f%%), target k = %g", report["kept"], report["total"],
                     100 * report["global_keep"], cfg.k)
            if self.cost_model is not None and cfg.soft_hw:
                log.info("hardware target a_target = %.6f (%s), current soft a = %.6f", self.cost_model.target,
                         "keep fraction" if cfg.prune_reg == "weight" else "FLOPs ratio",
                         float(self.cost_model.soft_cost().detach()))

    def _load_source(self) -> None:
        cfg = self.cfg
        path = source_checkpoint(cfg)
        if path is None:
            return
        if not os.path.exists(path):
            hint = "" if cfg.source_net else f" (run the {self.spec.source_mode} stage first, or pass --source-net PATH)"
            raise UserError(f"source checkpoint {path} does not exist{hint}")
        ckpt = load_checkpoint(path, map_location=self.device)
        check_checkpoint_config(ckpt, cfg, path)
        state = state_dict_of(ckpt, path)
        prune_from_source = self.spec.stage == "prune" or not any(k.endswith("." + SCORE_KEY) for k in state)
        load_weights(self.model, state, path, drop_pruning_state=prune_from_source)
        log.info("loaded source %s%s", path, f" (epoch {ckpt['epoch']})" if "epoch" in ckpt else "")
        if self.spec.masked:
            init_pruning_state(cfg, self.model, self.spec, have_scores=not prune_from_source)

    def _load_for_evaluation(self) -> None:
        path = self.cfg.source_net or checkpoint_path(self.directory, "best")
        ckpt = load_checkpoint(path, map_location=self.device)
        check_checkpoint_config(ckpt, self.cfg, path)
        load_weights(self.model, state_dict_of(ckpt, path), path, drop_pruning_state=False)
        if self.spec.masked:
            freeze_masks(self.model)
        log.info("evaluating %s", path)

    def _restore(self, ckpt: Dict) -> None:
        path = self.cfg.resume or checkpoint_path(self.directory, "last")
        load_weights(self.model, state_dict_of(ckpt, path), path, drop_pruning_state=False)
        self.start_epoch = int(ckpt["epoch"])
        self.best = float(ckpt.get("best_prec1", -math.inf))
        self.history = list(ckpt.get("history", []))
        if ckpt.get("gamma"):
            self.gamma.load_state_dict(ckpt["gamma"])
        if self.perturbation is not None and ckpt.get("free_perturbation"):
            self.perturbation.load_state_dict(ckpt["free_perturbation"], self.device)
        log.info("resuming %s after epoch %d of %d", path, self.start_epoch, self.total_epochs)

    def _optimizer(self, params) -> torch.optim.Optimizer:
        cfg = self.cfg
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.wd)
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)

    # -- per epoch
    def threat(self) -> ThreatModel:
        cfg = self.cfg
        return ThreatModel(eps=cfg.epsilon, step_size=cfg.step_size, steps=cfg.num_steps,
                           norm="linf" if cfg.distance == "l_inf" else "l2", clip_min=cfg.clip_min,
                           clip_max=cfg.clip_max)

    def validation_attack(self):
        cfg = self.cfg
        if cfg.val_method == "base":
            return None
        threat = dataclasses.replace(self.threat(), random_start=not cfg.const_init)
        if cfg.attack_eval == "fgsm":
            return lambda model, x, y: fgsm(model, x, y, cfg.epsilon, cfg.clip_min, cfg.clip_max)
        if cfg.attack_eval == "cw":
            return lambda model, x, y: pgd(model, x, y, threat, loss="cw")
        return lambda model, x, y: pgd(model, x, y, threat)

    def validate(self, epoch_label: str) -> Dict[str, float]:
        cfg = self.cfg
        on_val = self.data.num_val > 0
        shard = dict(rank=self.ctx.rank, world_size=self.ctx.world_size)
        batches = (self.data.val_batches(cfg.test_batch_size, **shard) if on_val
                   else self.data.test_batches(cfg.test_batch_size, **shard))
        sums = evaluate(self.model, batches, attack=self.validation_attack(),
                        num_batches=self.data.num_batches("val" if on_val else "test", cfg.test_batch_size,
                                                          world_size=self.ctx.world_size),
                        desc=f"{epoch_label} validate", show_progress=self.show_progress)
        return accuracies(all_reduce_sums(sums, self.ctx, self.device))

    @property
    def show_progress(self) -> bool:
        return not self.cfg.no_progress and self.ctx.is_main

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        cfg = self.cfg
        hw_loss = self.cost_model.loss if cfg.soft_hw and self.cost_model is not None else None
        gamma = self.gamma.value(epoch) if hw_loss else 0.0
        common = dict(epoch=epoch, num_batches=self.data.num_batches("train", self.local_batch,
                                                                     world_size=self.ctx.world_size),
                      device=self.device, hw_loss=hw_loss, gamma=gamma, bf16=cfg.bf16,
                      channels_last=cfg.channels_last, print_freq=cfg.print_freq, show_progress=self.show_progress)
        batches = self.data.train_batches(self.local_batch, epoch=epoch, seed=cfg.seed, rank=self.ctx.rank,
                                          world_size=self.ctx.world_size)
        if cfg.trainer == "freeadv":
            stats = train_one_epoch_free(self.train_model, batches, self.optimizer, self.perturbation,
                                         n_repeats=cfg.n_repeats, **common)
        else:
            loss_name = cfg.warmup_loss if epoch < cfg.warmup_epochs else cfg.adv_loss
            settings = ObjectiveSettings(threat=self.threat(), beta=cfg.beta)
            stats = train_one_epoch(self.train_model, self.attack_model, batches, self.optimizer,
                                    get_objective(loss_name), settings, **common)
        stats = self._reduce_train_stats(stats)
        if hw_loss:
            stats["gamma"] = gamma
        return stats

    def _reduce_train_stats(self, stats: Dict[str, float]) -> Dict[str, float]:
        """Example-weighted averages over all processes."""
        if not self.ctx.enabled:
            return stats
        n = stats["train_examples"]
        sums = {"n": n, "loss": stats["train_loss"] * n, "acc": stats["train_acc"] * n}
        if "hw_loss_mean" in stats:
            sums["hw"] = stats["hw_loss_mean"]
        total = all_reduce_sums(sums, self.ctx, self.device)
        out = {"train_loss": total["loss"] / total["n"], "train_acc": total["acc"] / total["n"],
               "train_examples": int(total["n"])}
        if "hw" in total:
            out["hw_loss_mean"] = total["hw"] / self.ctx.world_size
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
        if self.start_epoch == 0 and self.spec.masked and cfg.dataset != "imagenet":
            start = self.validate("start")
            log.info("before training: %s", ", ".join(f"{k} {v:.2f}" for k, v in start.items()))
        for epoch in range(self.start_epoch, self.total_epochs):
            seed_everything(epoch_seed(cfg.seed, epoch) + self.ctx.rank)  # distinct attack noise per process
            lr = lr_at_epoch(epoch, lr=cfg.lr, epochs=cfg.epochs, schedule=cfg.lr_schedule,
                             warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            started = time.time()
            record = {"epoch": epoch + 1, "lr": lr}
            record.update(self.train_epoch(epoch))
            last = epoch + 1 == self.total_epochs
            validated = (epoch + 1) % cfg.val_every == 0 or last
            if validated:
                record.update(self.validate(f"epoch {epoch + 1}"))
            eligible = validated
            if self.cost_model is not None:
                report = sparsity_report(self.model)
                record["keep"] = report["global_keep"]
                record["per_layer_keep"] = {n: v["keep"] for n, v in report["per_layer"].items()}
                if cfg.soft_hw:
                    with torch.no_grad():
                        hw, cost = self.cost_model.loss()
                    hw = float(hw)
                    self.gamma.end_of_epoch(epoch, hw)
                    record.update(hw_loss=hw, soft_cost=float(cost), target_met=target_met(hw))
                    eligible = eligible and target_met(hw)
            metric = record.get(self.selection_metric)
            is_best = eligible and metric is not None and metric > self.best
            if is_best:
                self.best = metric
            record.update(is_best=is_best, seconds=round(time.time() - started, 3))
            self.history.append(record)
            if self.ctx.is_main:
                self.save(epoch + 1, is_best, finished=last)
            barrier(self.ctx)
            log.info(_epoch_line(record))
            if "per_layer_keep" in record:
                log.info("per-layer keep: %s", ", ".join(f"{n}={v:.4f}" for n, v in record["per_layer_keep"].items()))

    # -- checkpoints
    def checkpoint_dict(self, epoch: int, finished: bool) -> Dict:
        report = sparsity_report(self.model) if self.spec.masked else None
        ckpt = {"format_version": FORMAT_VERSION, "epoch": epoch, "arch": self.cfg.arch, "exp_mode": self.cfg.exp_mode,
                "dataset": self.cfg.dataset, "state_dict": self.model.state_dict(),
                "best_prec1": self.best, "optimizer": self.optimizer.state_dict(), "gamma": self.gamma.state_dict(),
                "rng": rng_state(), "config": config_to_dict(self.cfg), "history": self.history,
                "finished": finished, "sparsity": report, "versions": versions()}
        if self.perturbation is not None:
            ckpt["free_perturbation"] = self.perturbation.state_dict()
        return ckpt

    def save(self, epoch: int, is_best: bool, finished: bool) -> None:
        ckpt = self.checkpoint_dict(epoch, finished)
        last = checkpoint_path(self.directory, "last")
        save_atomic(ckpt, last)
        if is_best:
            save_atomic(ckpt, checkpoint_path(self.directory, "best"))
        if self.cfg.save_dense and self.spec.masked:
            dense = {k: v for k, v in ckpt.items() if k not in ("optimizer", "rng", "free_perturbation")}
            dense["state_dict"] = dense_state_dict(self.model)
            save_atomic(dense, checkpoint_path(self.directory, "last_dense"))
            if is_best:
                save_atomic(dense, checkpoint_path(self.directory, "best_dense"))
        write_jsonl(os.path.join(self.directory, "metrics.jsonl"), self.history)


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


def evaluate_only(run: Run) -> None:
    """--evaluate: natural and validation-attack accuracy of the source (or the run's best) checkpoint."""
    result = run.validate("evaluate")
    log.info("evaluation: %s", ", ".join(f"{k} {v:.2f}" for k, v in result.items()))


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
    ctx = DistContext()
    try:
        cfg, sources = resolve_config(argv, "train", "train.py")
        buffer_logging(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
        ctx, device = init_distributed(os.environ, resolve_device(cfg.device, cfg.gpu, cfg.no_cuda))
        run = Run(cfg, sources, ctx, device)
        log.info("run directory: %s%s", run.directory, f" ({ctx.world_size} processes)" if ctx.enabled else "")
        for line in describe_overrides(sources, cfg):
            log.debug("config: %s", line)
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
            evaluate_only(run)
            return 0
        if writes:
            with open(os.path.join(run.directory, "config.yaml"), "w") as fh:
                yaml.safe_dump(config_to_dict(run.cfg), fh, sort_keys=True)
        run.run_epochs()
        if run.spec.hw_loss and run.cfg.soft_hw and not any(r.get("target_met") for r in run.history):
            final = run.history[-1]
            raise UserError(f"the keep target k = {run.cfg.k} was never reached in {run.cfg.epochs} epochs (final soft "
                            f"cost {final.get('soft_cost', float('nan')):.4f}, hw loss {final.get('hw_loss', float('nan')):.4f}), "
                            "so there is no model_best.pth.tar to finetune; rerun with --overwrite and a larger --gamma "
                            "or more --epochs")
        log.info("done: %s (best %s %.2f%%)", checkpoint_path(run.directory, "best"), run.selection_metric, run.best)
        return 0
    except UserError as err:
        where = f"[rank {ctx.rank}] " if ctx.enabled and not ctx.is_main else ""  # a rank-local problem must show
        print(f"train.py: error: {where}{err}", file=sys.stderr)
        return 2
    except BaseException:
        setup_logging(None)  # a bug or an interrupt: show what was logged before the traceback
        raise
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    sys.exit(main())
