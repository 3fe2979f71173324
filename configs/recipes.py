"""The stage recipes: one declarative record per exp-mode, the only place that knows what a mode does.

A recipe says which stage it belongs to (the preset section it reads), which mode's best checkpoint it starts
from, what trains, how scores and rates are initialised, whether masks are frozen, which extra loss terms
(regularizers) and per-epoch hooks it uses, and when an epoch may become the best checkpoint. The CLI resolver,
the run-directory layout, train.py, test.py and the table scripts read these fields; nothing else tests a mode
or stage name. A new pruning method is one new Recipe here (plus, if it needs one, a regularizer or hook
registered in trainers/regularizers.py). Per-mode *hyper-parameters* (lr, epochs) are not here: they live in
the dataset presets so a user's config or flag can override them.
"""
from dataclasses import dataclass, replace
from typing import Dict, FrozenSet, Optional, Tuple

from configs.errors import UserError

# What can train (pruning.trainable.set_trainable's switches).
WEIGHTS, SCORES, RATES = "weights", "scores", "rates"
# Score initialisation: HARP/Hydra's scaled magnitude init, or kept as loaded from the source (a plug-in may name
# another one it registers in pruning.init.SCORE_INITS).
SCORES_MAGNITUDE, SCORES_FROM_SOURCE = "magnitude", "source"
# Rate initialisation: the --stg_id strategy, uniform at --k, kept as loaded from the source, or none because the
# masks themselves decide each layer's rate (in-train gates).
RATES_STRATEGY, RATES_UNIFORM, RATES_FROM_SOURCE, RATES_FROM_MASKS = "strategy", "uniform", "source", "masks"
# Mask kinds (pruning.layers.MASK_KINDS): HARP/Hydra's top-|score| masks at a keep rate, or in-train pruning's
# trainable binary gates (pruning/gates.py).
MASKS_TOPK, MASKS_GATES = "topk", "gates"
# Best-checkpoint rules: every validated epoch may be best, or only those that meet the hardware target.
BEST_ANY_EPOCH, BEST_ONCE_TARGET_MET = "any_epoch", "target_met"
DENSE_METHOD = "dense"  # the table row of unpruned models


@dataclass(frozen=True)
class Recipe:
    name: str
    stage: str                                   # preset section: 'pretrain', 'prune' or 'finetune'
    method: str                                  # row label in tables and plots
    starts_from: Optional[str] = None            # mode whose best checkpoint this one loads (None: fresh model)
    masked: bool = False                         # the model carries scores and rate logits
    mask_kind: str = MASKS_TOPK                  # the masked layers' kind (masked modes)
    trains: FrozenSet[str] = frozenset({WEIGHTS})
    score_init: Optional[str] = None             # SCORES_FROM_SOURCE or a pruning.init.SCORE_INITS name (masked)
    rate_init: Optional[str] = None              # RATES_* (masked modes)
    freeze_masks: bool = False                   # masks fixed once set up: pruned weights zero, W trains
    regularizers: Tuple[str, ...] = ()           # extra loss terms by registered name (trainers/regularizers.py)
    hooks: Tuple[str, ...] = ()                  # per-epoch hooks by registered name (trainers/regularizers.py)
    best_when: str = BEST_ANY_EPOCH
    shares_pretrain_name: bool = False           # the run directory sits beside the pretrain run, not under a name
    final: bool = True                           # its model is the method's result (a prune stage's is not)
    # (option, value, mode): an option set to this value by the user turns the run into that mode instead
    becomes: Tuple[Tuple[str, object, str], ...] = ()


# The original spelling of LWM: any finetune told to start from magnitude scores (`score_finetune
# --scaled-score-init`) is the LWM run.
_LWM_SPELLING = (("scaled_score_init", True, "lwm_finetune"),)

_RECIPES = (
    Recipe("pretrain", "pretrain", DENSE_METHOD, shares_pretrain_name=True),
    # Hydra (Sehwag et al. 2020): scores learned at a uniform --k, then the masked weights finetuned.
    Recipe("score_prune", "prune", "Hydra (score)", starts_from="pretrain", masked=True, trains=frozenset({SCORES}),
           score_init=SCORES_MAGNITUDE, rate_init=RATES_UNIFORM, final=False),
    Recipe("score_finetune", "finetune", "Hydra (score)", starts_from="score_prune", masked=True, freeze_masks=True,
           score_init=SCORES_FROM_SOURCE, rate_init=RATES_FROM_SOURCE,
           becomes=_LWM_SPELLING),
    # Least weight magnitude: masks by |W| at a uniform --k straight from the pretrained net, then finetuned.
    Recipe("lwm_finetune", "finetune", "LWM", starts_from="pretrain", masked=True, freeze_masks=True,
           score_init=SCORES_MAGNITUDE, rate_init=RATES_UNIFORM),
    # HARP's ablation: per-layer rates learned under the hardware loss, magnitude scores.
    Recipe("rate_prune", "prune", "rate", starts_from="pretrain", masked=True, trains=frozenset({RATES}),
           score_init=SCORES_MAGNITUDE, rate_init=RATES_STRATEGY, regularizers=("hardware",),
           hooks=("dynamic_gamma",), best_when=BEST_ONCE_TARGET_MET, final=False),
    Recipe("rate_finetune", "finetune", "rate", starts_from="rate_prune", masked=True, freeze_masks=True,
           score_init=SCORES_FROM_SOURCE, rate_init=RATES_FROM_SOURCE, becomes=_LWM_SPELLING),
    # HARP (Zhao & Wressnegger 2023): scores and per-layer rates learned together under the hardware loss.
    Recipe("harp_prune", "prune", "HARP", starts_from="pretrain", masked=True, trains=frozenset({SCORES, RATES}),
           score_init=SCORES_MAGNITUDE, rate_init=RATES_STRATEGY, regularizers=("hardware",),
           hooks=("dynamic_gamma",), best_when=BEST_ONCE_TARGET_MET, final=False),
    Recipe("harp_finetune", "finetune", "HARP", starts_from="harp_prune", masked=True, freeze_masks=True,
           score_init=SCORES_FROM_SOURCE, rate_init=RATES_FROM_SOURCE, becomes=_LWM_SPELLING),
    # In-train pruning (Vemparala et al. 2021): weights and binary gates trained together from random init, the
    # budget loss driving the kept parameters / FLOPs to --k, a hard projection and frozen gates in the last
    # --gate-settle-epochs; optionally the weights finetuned under the final masks.
    Recipe("intrain", "pretrain", "in-train", masked=True, mask_kind=MASKS_GATES, trains=frozenset({WEIGHTS, SCORES}),
           rate_init=RATES_FROM_MASKS, regularizers=("hardware",), hooks=("dynamic_gamma", "gate_settle"),
           best_when=BEST_ONCE_TARGET_MET, final=False),
    Recipe("intrain_finetune", "finetune", "in-train", starts_from="intrain", masked=True, mask_kind=MASKS_GATES,
           freeze_masks=True, score_init=SCORES_FROM_SOURCE, rate_init=RATES_FROM_SOURCE),
)
RECIPES: Dict[str, Recipe] = {r.name: r for r in _RECIPES}
STAGES = ("pretrain", "prune", "finetune")
METHODS = tuple(dict.fromkeys(r.method for r in _RECIPES))


def register_recipe(spec: Recipe) -> Recipe:
    """Add an exp-mode (a plug-in's pruning method); it becomes a --exp-mode choice at once."""
    if spec.name in RECIPES:
        raise ValueError(f"exp-mode {spec.name!r} is registered twice")
    if spec.stage not in STAGES or (spec.starts_from is not None and spec.starts_from not in RECIPES):
        raise ValueError(f"recipe {spec.name!r}: stage must be one of {STAGES} and starts_from a registered mode")
    RECIPES[spec.name] = spec
    return spec


def mode_names() -> tuple:
    return tuple(RECIPES)


def canonical_mode(name: str) -> str:
    """Accept the README's hyphenated spellings (`harp-prune`) as well as `harp_prune`."""
    key = name.strip().replace("-", "_").lower()
    if key not in RECIPES:
        raise UserError(f"unknown exp-mode {name!r}; choose one of: {', '.join(RECIPES)}")
    return key


def recipe(name: str) -> Recipe:
    return RECIPES[canonical_mode(name)]


def effective_recipe(spec: Recipe, cfg) -> Recipe:
    """The recipe as the user's switches leave it: --soft-hw / --no-soft-hw adds or removes the hardware loss
    together with its dynamic gamma and its best-checkpoint rule (masked modes only)."""
    has_hardware = "hardware" in spec.regularizers
    if not spec.masked or cfg.soft_hw is None or bool(cfg.soft_hw) == has_hardware:
        return spec
    if cfg.soft_hw:
        return replace(spec, regularizers=spec.regularizers + ("hardware",), hooks=spec.hooks + ("dynamic_gamma",),
                       best_when=BEST_ONCE_TARGET_MET)
    return replace(spec, regularizers=tuple(r for r in spec.regularizers if r != "hardware"),
                   hooks=tuple(h for h in spec.hooks if h != "dynamic_gamma"), best_when=BEST_ANY_EPOCH)


def mode_of_foreign_checkpoint(has_rates: bool) -> str:
    """The mode a pruned checkpoint of the original code is labelled with when no --exp-mode describes it: HARP's
    layout carries rate logits, Hydra's does not."""
    return "harp_finetune" if has_rates else "score_finetune"
