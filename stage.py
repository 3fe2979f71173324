"""Stage set-up: the one place that wires data, a model, its masks and the training parts together from a resolved
Config and its recipe (configs/recipes.py). train.py, test.py and scripts/benchmark.py all build through here;
test.py also adopts the config stored in the checkpoint it evaluates, or infers what a foreign checkpoint is.

Layer 5 like the entry points (it may import every package); library packages never import it.
"""
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from configs.cli import preset_path, resolve_config
from configs.errors import UserError
from configs.recipes import (MASKS_GATES, RATES, RATES_FROM_MASKS, RECIPES, SCORES, SCORES_FROM_SOURCE, WEIGHTS,
                             Recipe, effective_recipe, mode_of_foreign_checkpoint)
from configs.recipes import recipe as mode_recipe
from data import DataSource, build_data
from models import create_model
from pruning.gates import tie_gates
from pruning.budget import CostModel
from pruning.graph import LayerGraph, inspect_layers
from pruning.init import SCORE_INITS, init_scores_from_weights, init_scores_random, set_keep_rates, tie_rates
from pruning.loading import check_trained_with, describe_state, load_weights
from pruning.masks import kept_channel_count
from pruning.trainable import set_trainable
from pruning.wrap import freeze_masks, masked_layers, sparsify
from strategies.files import split_file_strategy
from strategies.start import start_rates
from trainers.attacks.threat import LINF, ThreatModel, threat_from_config
from trainers.evaluation.registry import NATURAL, attack_names, validation_attack_names
from trainers.objectives import OBJECTIVES
from trainers.protocols import EpochHook, Stateful, TrainingLoop
from trainers.regularizers import HOOKS, REGULARIZERS, Regularizer
from trainers.training import TRAINERS
from utils.checkpoint import load_checkpoint, state_dict_of
from utils.run_dir import source_checkpoint

log = logging.getLogger("stage")


def option_choices() -> Dict[str, List[str]]:
    """The registry-backed CLI choices (configs.schema.REGISTRY_CHOICES), plus the attack names for --help."""
    return {"trainer": TRAINERS.in_order(), "adv_loss": OBJECTIVES.in_order(),
            "attack_eval": validation_attack_names(), "attacks": [NATURAL] + attack_names()}


# ----------------------------------------------------------------------------------------------- data and model
def load_data(cfg, device: torch.device) -> DataSource:
    return build_data(cfg.dataset, data_dir=cfg.data_dir, data_fraction=cfg.data_fraction, download=cfg.download,
                      seed=cfg.seed, image_dim=cfg.image_dim, workers=cfg.workers, val_split=cfg.val_split).to(device)


def example_input(info, device) -> torch.Tensor:
    return torch.zeros(1, info.in_channels, info.image_size, info.image_size, device=device)


def build_model(cfg, info, device: torch.device, masked: bool) -> nn.Module:
    """The dense architecture of `cfg`; with `masked`, every conv/linear masked (k_min = alpha * k)."""
    model = create_model(cfg.arch, num_classes=cfg.num_classes, in_channels=info.in_channels,
                         normalize=cfg.normalize, mean=cfg.mean or info.mean, std=cfg.std or info.std,
                         init_type=cfg.init_type, input_size=info.image_size).to(device)
    if masked:
        sparsify(model, cfg.prune_reg, keep_min=cfg.alpha * cfg.k, kind=mode_recipe(cfg.exp_mode).mask_kind)
    return model


def inspect_masked(cfg, model: nn.Module, info, device) -> LayerGraph:
    """One hook pass over a masked model; under channel granularity it ties the rates of layers that read the
    same tensor (a block's conv1 and its shortcut) and warns about a target that leaves too little."""
    graph = inspect_layers(model, example_input(info, device))
    if cfg.prune_reg == "channel":
        gated = mode_recipe(cfg.exp_mode).mask_kind == MASKS_GATES  # in-train gates: the channels themselves are shared
        ties = (tie_gates if gated else tie_rates)(model, graph.tie_groups)
        if ties:
            log.info("channel %s tied to the layer that shares their input: %s", "gates" if gated else "rates", ties)
        warn_about_channel_target(cfg, model, graph)
    return graph


# Below this FLOPs fraction a channel-pruned network is too thin to learn anything (0.1 %).
MIN_CHANNEL_FLOPS = 1e-3


def warn_about_channel_target(cfg, model: nn.Module, graph: LayerGraph) -> None:
    """Channel granularity's k is the kept fraction of each layer's input channels, so the FLOPs target is about
    k^2: warn when a layer at k keeps fewer channels than there are classes, or under 0.1 % of the FLOPs. A layer
    with fewer inputs than classes (the first conv's 3 image channels) is no such bottleneck at any k."""
    thin = [name for name, layer in masked_layers(model) if layer.weight.shape[1] >= cfg.num_classes
            and kept_channel_count(cfg.k, layer.weight.shape[1]) < cfg.num_classes]
    flops = CostModel(model, graph, "channel", cfg.k).target
    if thin:
        log.warning("--k %g with --prune_reg channel keeps fewer input channels than the %d classes in %s: k is the "
                    "kept fraction of channels per layer (FLOPs about k^2 = %.2g); expect accuracy near chance, or use "
                    "a larger --k", cfg.k, cfg.num_classes, ", ".join(thin[:4]) + ("..." if len(thin) > 4 else ""),
                    flops)
    elif flops < MIN_CHANNEL_FLOPS:
        log.warning("--k %g with --prune_reg channel targets %.2g of the FLOPs (about k^2): under 0.1 %% is unlikely "
                    "to train; use a larger --k", cfg.k, flops)


# ----------------------------------------------------------------------------------------------- masks
def init_pruning_state(cfg, recipe: Recipe, model: nn.Module) -> None:
    """Fresh scores and rate logits: magnitude scores (--scaled-score-init), random ones (--scores-init-type) or
    the recipe's own score initialisation; rates from --stg_id (--rate-stg-init; `strategies.start.start_rates`
    picks the source) or uniform at --k. The recipe decides the defaults of both switches."""
    if cfg.scaled_score_init:
        init_scores_from_weights(model)
    elif cfg.scores_init_type:
        init_scores_random(model, cfg.scores_init_type)
    elif recipe.score_init in SCORE_INITS:
        SCORE_INITS.get(recipe.score_init)(model)
    if recipe.rate_init == RATES_FROM_MASKS:  # no rate logits to set (in-train gates)
        return
    # A strategy file is only ever named to be used, so it sets the rates in every mode (Heracles' non-uniform
    # Hydra: score_prune / lwm_finetune, whose recipes start uniform at --k).
    if cfg.rate_stg_init or split_file_strategy(cfg.stg_id) is not None:
        weights = {name: layer.weight for name, layer in masked_layers(model)}
        rates = start_rates(cfg.stg_id, arch=cfg.arch, granularity=cfg.prune_reg, weights=weights)
        origin = cfg.stg_id
    else:
        rates, origin = {name: cfg.k for name, _ in masked_layers(model)}, f"uniform k = {cfg.k}"
    raised = set_keep_rates(model, rates)
    if raised:
        log.warning("start rate at or below k_min = %g for %s; those layers start at k_min", cfg.alpha * cfg.k, raised)
    log.info("start keep rates (%s): %s", origin,
             ", ".join(f"{n}={float(l.keep_rate().detach()):.4f}" for n, l in masked_layers(model)))


def fit_checkpoint(model: nn.Module, ckpt: Dict, path: str, *, keep_pruning_state: bool, k: float,
                   **trained_with) -> None:
    """Fit a loaded checkpoint's weights to `model` (pruning.loading), refusing one trained with other
    `trained_with` settings (arch, dataset)."""
    check_trained_with(ckpt, path, **trained_with)
    load_weights(model, state_dict_of(ckpt, path), path, keep_pruning_state=keep_pruning_state, uniform_keep=k)


def load_checkpoint_into(model: nn.Module, path: str, device, *, keep_pruning_state: bool, k: float,
                         **trained_with) -> Dict:
    """Read `path` and fit its weights to `model`; returns the checkpoint."""
    ckpt = load_checkpoint(path, map_location=device)
    fit_checkpoint(model, ckpt, path, keep_pruning_state=keep_pruning_state, k=k, **trained_with)
    return ckpt


@dataclass(frozen=True)
class Source:
    """Weights a stage starts from: a checkpoint as read (its weights under `state_dict`) and where it came from (a
    path, or what the weights in memory are)."""
    ckpt: Dict
    path: str

    @classmethod
    def of_model(cls, model: nn.Module, label: str) -> "Source":
        """A model's own weights in memory (scripts/benchmark.py starts its stages from the model before)."""
        return cls({"state_dict": model.state_dict()}, label)


def recipe_source(cfg, recipe: Recipe, device) -> Optional[Source]:
    """The stage's source checkpoint: the recipe's `starts_from` run, or --source-net; None for a fresh model."""
    path = source_checkpoint(cfg)
    if path is None:
        return None
    if not os.path.exists(path):
        hint = "" if cfg.source_net else f" (run the {recipe.starts_from} stage first, or pass --source-net PATH)"
        raise UserError(f"source checkpoint {path} does not exist{hint}")
    return Source(load_checkpoint(path, map_location=device), path)


def start_from_source(cfg, recipe: Recipe, model: nn.Module, source: Optional[Source]) -> None:
    """Load the stage's source (None: a fresh model) and set up the masks: kept from the source when the recipe
    says so, else initialised afresh on the loaded weights."""
    if source is None:
        if recipe.masked:
            init_pruning_state(cfg, recipe, model)
        return
    from_source = recipe.masked and recipe.score_init == SCORES_FROM_SOURCE
    ckpt, path = source.ckpt, source.path
    if from_source and not describe_state(state_dict_of(ckpt, path)).has_scores:
        raise UserError(f"the source checkpoint {path} has no pruning scores; run the {recipe.starts_from} "
                        "stage first, or finetune magnitude masks from a dense model with --exp-mode lwm_finetune")
    fit_checkpoint(model, ckpt, path, keep_pruning_state=from_source, k=cfg.k, arch=cfg.arch, dataset=cfg.dataset)
    log.info("loaded source %s%s", path, f" (epoch {ckpt['epoch']})" if "epoch" in ckpt else "")
    if recipe.masked and not from_source:
        init_pruning_state(cfg, recipe, model)


# ----------------------------------------------------------------------------------------------- training parts
@dataclass
class TrainingParts:
    """What a training run steps besides the model: the loop, the optimizer and the recipe's extras."""
    recipe: Recipe
    loop: TrainingLoop
    optimizer: torch.optim.Optimizer
    regularizers: Dict[str, Regularizer]
    hooks: Dict[str, EpochHook]

    def stateful(self) -> Dict[str, Stateful]:
        """Every part with state to checkpoint, by the checkpoint key it declares."""
        parts = [self.loop, *self.regularizers.values(), *self.hooks.values()]
        return {part.state_key: part for part in parts if isinstance(part, Stateful)}

    def load_state_dict(self, ckpt: Dict) -> None:
        """The optimizer and every stateful part from a checkpoint train.py wrote: one generic path."""
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for key, part in self.stateful().items():
            if ckpt.get(key) is not None:
                part.load_state_dict(ckpt[key])


def set_up_training(cfg, recipe: Recipe, model: nn.Module, graph: Optional[LayerGraph], threat,
                    device: torch.device) -> TrainingParts:
    """Trainable parameters and frozen masks as the recipe says (once the model holds its final weights and
    scores), the loop, the optimizer, regularizers and hooks."""
    recipe = effective_recipe(recipe, cfg)
    trains = recipe.trains
    set_trainable(model, weights=WEIGHTS in trains, scores=SCORES in trains, rates=RATES in trains,
                  norm_layers=WEIGHTS in trains or not cfg.freeze_bn)
    regularizers = {name: REGULARIZERS.get(name)(cfg, model, graph) for name in recipe.regularizers}
    loop: TrainingLoop = TRAINERS.get(cfg.trainer)(cfg, threat, device)
    hook_names = recipe.hooks + tuple(loop.hooks)  # the recipe's, then the loop's own (Fast-AT)
    hooks = {name: HOOKS.get(name)(cfg, regularizers) for name in hook_names}
    loop.check_model(model)  # a loop that needs a kind of model (CROWN-IBP: a Sequential) refuses others here
    if recipe.freeze_masks:
        freeze_masks(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    for regularizer in regularizers.values():  # after every step, under whichever loop steps the optimizer
        optimizer.register_step_post_hook(lambda _optimizer, _args, _kwargs, r=regularizer: r.after_step())
    return TrainingParts(recipe, loop, optimizer, regularizers, hooks)


def make_optimizer(cfg, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.wd)
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)


# ----------------------------------------------------------------------------------------------- the stage builder
@dataclass
class Stage:
    """One stage as a run trains it: the model, the training parts and, for a masked model, its cost model (where
    its masks stand against the target, `CostModel.budget`)."""
    model: nn.Module
    parts: TrainingParts
    cost_model: Optional[CostModel] = None


def build_stage_model(cfg, recipe: Recipe, info, device: torch.device) -> Tuple[nn.Module, Optional[LayerGraph]]:
    """The stage's model, masked if the recipe says so (then inspected: rates tied under channel granularity)."""
    model = build_model(cfg, info, device, masked=recipe.masked)
    return model, inspect_masked(cfg, model, info, device) if recipe.masked else None


def build_stage(cfg, info, device: torch.device, threat, *, source: Optional[Source] = None,
                resume: Optional[Source] = None) -> Stage:
    """The stage of `cfg` (its exp-mode's recipe as the user's switches leave it), ready to train: the model,
    started from `source` (the recipe's source checkpoint, `recipe_source`; None: a fresh model) or holding an
    interrupted run's weights (`resume`), and the training parts, with `resume`'s optimizer and part states.
    train.py and scripts/benchmark.py build every stage through here."""
    recipe = effective_recipe(mode_recipe(cfg.exp_mode), cfg)
    model, graph = build_stage_model(cfg, recipe, info, device)
    if resume is None:
        start_from_source(cfg, recipe, model, source)
    else:
        fit_checkpoint(model, resume.ckpt, resume.path, keep_pruning_state=True, k=cfg.k)
    parts = set_up_training(cfg, recipe, model, graph, threat, device)
    if resume is not None:
        parts.load_state_dict(resume.ckpt)
    return Stage(model, parts, CostModel(model, graph, cfg.prune_reg, cfg.k) if graph is not None else None)


# ----------------------------------------------------------------------------------------------- evaluated checkpoints
# What defines the model: taken from the config stored in one of our checkpoints.
MODEL_KEYS = ("arch", "dataset", "num_classes", "normalize", "mean", "std", "init_type", "prune_reg", "k", "alpha",
              "exp_mode", "stg_id", "image_dim", "trainer", "adv_loss", "exp_name")
# Given explicitly, these must agree with the stored config (k, alpha and prune_reg only for masked modes).
CHECKED_KEYS = ("arch", "dataset", "exp_mode", "prune_reg", "k", "alpha")


def explicit(sources: Dict[str, str], cfg, key: str) -> bool:
    """Set by the user (command line or their --configs file), not by a default or the dataset preset."""
    source = sources.get(key, "default")
    return source == "command line" or bool(cfg.configs and source.startswith(cfg.configs))


def adopt_checkpoint(argv: List[str], cfg, sources: Dict[str, str], ckpt: Dict, path: str) -> Tuple[object, Dict]:
    """test.py's config for the checkpoint it evaluates: one of ours is described by the config stored in it,
    another one (original HARP/Hydra code, a bare state_dict) by the flags, with what its scores tell."""
    if isinstance(ckpt.get("config"), dict):
        return adopt_stored_config(argv, cfg, sources, ckpt, path)
    return describe_foreign(cfg, sources, state_dict_of(ckpt, path), path), sources


def adopt_stored_config(argv: List[str], cfg, sources: Dict[str, str], ckpt: Dict, path: str) -> Tuple[object, Dict]:
    """For one of our checkpoints, the model is described by the config stored in it, not by the flags.

    A flag given explicitly that contradicts it is an error. If the stored dataset differs from an implicit
    one (--source-net without --dataset), the config is resolved again for that dataset so its preset
    (eps, step size, batch size) applies.
    """
    stored = ckpt["config"]
    masked = RECIPES.get(stored.get("exp_mode"), RECIPES["pretrain"]).masked
    for key in CHECKED_KEYS:
        if key in ("prune_reg", "k", "alpha") and not masked:
            continue
        if key in stored and stored[key] != getattr(cfg, key) and explicit(sources, cfg, key):
            raise UserError(f"checkpoint {path} was trained with {key} {stored[key]!r}, not {getattr(cfg, key)!r} "
                            f"(drop --{key.replace('_', '-')} to use the checkpoint's own)")
    if stored.get("dataset") and stored["dataset"] != cfg.dataset:
        cfg, sources = resolve_config(argv + ["--dataset", stored["dataset"]], "test", "test.py",
                                      choices=option_choices())
    changes = {k: stored[k] for k in MODEL_KEYS if k in stored and k in cfg.__dataclass_fields__}
    changes.update(trained_model_options(stored, cfg, sources, path))
    return dataclasses.replace(cfg, **changes), sources


def trained_model_options(stored: Dict, cfg, sources: Dict[str, str], path: str) -> Dict:
    """The stored values of the options the checkpoint's training loop declares part of its model
    (`model_options`: a smoothed model's noise_std). An explicit different value is honoured with a warning."""
    loop = TRAINERS.get(stored["trainer"]) if stored.get("trainer") in TRAINERS else None
    adopted = {}
    for key in getattr(loop, "model_options", ()):
        if key not in stored or stored[key] == getattr(cfg, key):
            continue
        if explicit(sources, cfg, key):
            log.warning("checkpoint %s was trained with %s %r; evaluating with %r as --%s says", path, key,
                        stored[key], getattr(cfg, key), key.replace("_", "-"))
        else:
            adopted[key] = stored[key]
    return adopted


def describe_foreign(cfg, sources: Dict[str, str], state: Dict, path: str):
    """A checkpoint without a stored config: the flags describe it; the granularity and a missing --exp-mode are
    inferred from the scores."""
    contents = describe_state(state)
    changes = {}
    if contents.has_scores:
        if contents.granularity != cfg.prune_reg:
            if explicit(sources, cfg, "prune_reg"):
                raise UserError(f"checkpoint {path} holds {contents.granularity}-granularity scores, not --prune-reg "
                                f"{cfg.prune_reg}")
            changes["prune_reg"] = contents.granularity
            log.info("scores in %s have %s granularity", path, contents.granularity)
        if not RECIPES[cfg.exp_mode].masked:
            mode = mode_of_foreign_checkpoint(contents.has_rates)
            if explicit(sources, cfg, "exp_mode"):
                raise UserError(f"checkpoint {path} holds pruning scores; --exp-mode {cfg.exp_mode} describes a dense "
                                f"model (use e.g. --exp-mode {mode})")
            changes["exp_mode"] = mode
            log.info("no --exp-mode given: labelling this pruned checkpoint %s", mode)
    return dataclasses.replace(cfg, **changes) if changes else cfg


@dataclass(frozen=True)
class CheckpointKind:
    """What test.py evaluates: one of our checkpoints (with its config) or an external one, masked or plain."""
    own: bool
    masked: bool

    @property
    def label(self) -> str:
        return ("toolkit" if self.own else "external") + (" (masked)" if self.masked else " (plain weights)")


def checkpoint_kind(ckpt: Dict, path: str) -> CheckpointKind:
    return CheckpointKind(own=isinstance(ckpt.get("config"), dict),
                          masked=describe_state(state_dict_of(ckpt, path)).has_scores)


def build_evaluated_model(cfg, info, ckpt: Dict, path: str, device: torch.device) -> nn.Module:
    """The evaluated model (fp32, masks frozen, eval mode): masked when the checkpoint carries scores, else plain."""
    masked = describe_state(state_dict_of(ckpt, path)).has_scores
    if masked and cfg.k is None:
        raise UserError(f"checkpoint {path} holds pruning scores but no config: pass --k (and --alpha) as in training")
    model = build_model(cfg, info, device, masked=masked).float()
    fit_checkpoint(model, ckpt, path, keep_pruning_state=True, k=cfg.k)
    if masked:
        freeze_masks(model)
    model.eval()
    return model


def evaluation_threat(cfg, sources: Dict[str, str]) -> ThreatModel:
    """test.py's threat model: the configured one; an L2 one steps eps/4 unless --step-size is given (the presets'
    step sizes are Linf ones), with a warning when its eps also comes from a Linf preset."""
    threat = threat_from_config(cfg)
    if threat.norm == LINF:
        return threat
    if not explicit(sources, cfg, "step_size"):
        threat = threat.with_(step_size=cfg.epsilon / 4)
    if not explicit(sources, cfg, "epsilon"):
        log.warning("--distance l_2 with eps %g from %s, which is a Linf budget; pass --epsilon "
                    "(0.5 is the usual L2 budget on CIFAR-10)", cfg.epsilon, os.path.relpath(preset_path(cfg.dataset)))
    return threat
