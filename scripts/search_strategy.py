"""Search per-layer keep ratios under a budget, as Heracles does, and write the best as a strategy file.

    python train.py --dataset digits --exp-mode pretrain
    python scripts/search_strategy.py --dataset digits --k 0.05 --method evolution --episodes 100 --val-split 0.3
    python train.py --dataset digits --exp-mode score_prune    --k 0.05 --stg_id OUT/strategy.yaml:evolution_0.05
    python train.py --dataset digits --exp-mode score_finetune --k 0.05 --stg_id OUT/strategy.yaml:evolution_0.05

Heracles (Zhao, Königl & Wressnegger, AutoML 2022) searches one keep ratio per layer
for an adversarially pre-trained network and hands the strategy to Hydra, R-ADMM or HARP as per-layer rates.
This script takes the same flags as train.py (--dataset, --arch, --adv_loss, --result-dir, --k, --prune_reg, the
threat model, --seed, --device, ...). It loads the best checkpoint of the matching pretrain run (or
--source-net), masks every conv/linear layer by weight magnitude (HARP/Hydra's scaled score init) and scores a
strategy with Heracles' reward "acc+aa": natural plus PGD accuracy (fractions, so at most 2) of the masked, NOT
fine-tuned network on a held-out part of the training set (--val-split; 0.1 when not given, Heracles' 5k of 50k),
under the configured threat model and validation attack (--attack-eval, --num-steps: PGD-10 in every preset),
with the attack's random start seeded by --seed for every strategy alike (--seed also seeds the search). One
masked model is reused: a strategy only resets the layers' rate logits, and the split is scored in
--test-batch-size batches on the device.

The search (strategies.search) keeps sum_l c_l k_l <= budget * sum_l c_l with c_l a layer's weights
(--cost params) or FLOPs (--cost flops), budget = --budget (default --k), and every k_l within --bounds (Heracles:
0.01-0.8 for weights; 0.1-1 for channels). --method ddpg is Heracles' AMC-style agent; random and evolution are
cheaper baselines (evolution by default: at a tight budget the DDPG agent's sequential action wall starves the
last layers). Under channel granularity, layers that read the same tensor share one searched rate.

Written to --out (default <experiment root>/search/<dataset>_<prune_reg>_<cost>_<budget>/<method>/):
  episodes.csv    one row per episode (Heracles' Episode_wise_Rewards.csv): reward, best reward so far, natural
                  and robust accuracy, cost fraction, keep.<layer> for every layer
  strategy.yaml   the best strategy as id --strategy-id (default <method>_<budget>), or --strategy-file (a .json
                  file is Heracles' format); pass it as --stg_id FILE:ID
  summary.json    the best strategy and its reward next to the uniform, ERK and LAMP allocations at the budget
A finished search is not overwritten without --overwrite.
"""
import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from configs.cli import build_parser, resolve_config  # noqa: E402
from configs.errors import UserError  # noqa: E402
from strategies import RULES  # noqa: E402
from strategies.allocation import allocate_keep_rates  # noqa: E402
from pruning.graph import inspect_layers  # noqa: E402
from pruning.init import init_scores_from_weights, set_keep_rates, tie_rates  # noqa: E402
from strategies.search import (COSTS, METHODS, DDPGConfig, EvolutionConfig, SearchLayer,  # noqa: E402
                                     describe_layers, search_strategy)
from pruning.wrap import masked_layers, sparsify  # noqa: E402
from stage import build_model, example_input, load_checkpoint_into, load_data, option_choices  # noqa: E402
from strategies.files import read_strategies, save_strategies  # noqa: E402
from trainers.attacks.threat import threat_from_config  # noqa: E402
from trainers.evaluation.scoring import accuracies  # noqa: E402
from trainers.evaluation.validation import validate  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.logging import setup_logging, write_json  # noqa: E402
from utils.run_dir import experiment_root, source_checkpoint  # noqa: E402
from utils.seed import seed_everything  # noqa: E402

PROG = "search_strategy.py"
# The configuration is resolved as Hydra's prune stage: a masked mode that starts from the pretrain run, so --k is
# required and the source is the pretrained model, exactly what Heracles' search starts from.
CONFIG_MODE = "score_prune"
DEFAULT_REWARD_SPLIT = 0.1  # Heracles: 5,000 of CIFAR-10's 50,000 training images
DEFAULT_BOUNDS = {"weight": (0.01, 0.8), "channel": (0.1, 1.0)}  # Heracles' action bounds
# Allocations at the budget scored next to the search (strategies.allocation): every rule but the dense start.
REFERENCE_RULES = tuple(rule for rule in RULES if rule != "original")
Reward = Callable[[Dict[str, float]], Dict[str, float]]


# ----------------------------------------------------------------------------------------------- command line
def search_parser(add_help: bool = False, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], add_help=add_help,
                                     usage=f"{PROG} [search options] [train.py options: --dataset, --k, ...]",
                                     allow_abbrev=False, parents=list(parents),
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    group = parser.add_argument_group("strategy search")
    group.add_argument("--method", default="evolution", choices=METHODS,
                       help="ddpg: Heracles' AMC agent; random: projected random draws; evolution: (mu+1) evolution "
                            "strategy (default: evolution)")
    group.add_argument("--episodes", type=int, default=100, help="strategies evaluated, DDPG warm-up included "
                       "(default 100; Heracles: 400)")
    group.add_argument("--budget", type=float, default=None, help="kept fraction of the cost (default: --k)")
    group.add_argument("--cost", default="params", choices=COSTS, help="what the budget counts (default: params)")
    group.add_argument("--bounds", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                       help="keep ratio bounds of every layer (default: 0.01 0.8 for weight, 0.1 1.0 for channel)")
    group.add_argument("--population", type=int, default=EvolutionConfig.population,
                       help=f"evolution: members kept (default {EvolutionConfig.population})")
    group.add_argument("--mutation", type=float, default=EvolutionConfig.mutation,
                       help=f"evolution: sigma of the log-space mutation (default {EvolutionConfig.mutation})")
    group.add_argument("--ddpg-hidden", type=int, default=DDPGConfig.hidden,
                       help=f"ddpg: units per hidden layer (default {DDPGConfig.hidden}; Heracles 300)")
    group.add_argument("--ddpg-warmup", type=int, default=DDPGConfig.warmup,
                       help=f"ddpg: random warm-up episodes (default {DDPGConfig.warmup}; Heracles 100)")
    group.add_argument("--ddpg-batch-size", type=int, default=DDPGConfig.batch_size,
                       help=f"ddpg: transitions per update (default {DDPGConfig.batch_size}; Heracles 128)")
    group.add_argument("--out", default=None, help="output folder (default: <experiment root>/search/"
                       "<dataset>_<prune_reg>_<cost>_<budget>/<method>)")
    group.add_argument("--strategy-file", default=None, help="where the best strategy goes (default: "
                       "OUT/strategy.yaml; .json: Heracles' format), merged into an existing file")
    group.add_argument("--strategy-id", default=None, help="its id in the file (default: <method>_<budget>)")
    return parser


def parse(argv: Sequence[str]):
    """(search arguments, Config): the search flags here, every other flag resolved as train.py resolves it."""
    if "-h" in argv or "--help" in argv:
        config_flags = build_parser(PROG, "train", choices=option_choices(), add_help=False)
        search_parser(add_help=True, parents=[config_flags]).parse_args(["--help"])
    args, rest = search_parser().parse_known_args(list(argv))
    if any(a.split("=")[0] in ("--exp-mode", "--exp_mode") for a in rest):
        raise UserError("the search starts from the pretrained model: drop --exp-mode (--source-net PATH names "
                        "another checkpoint)")
    given, _ = resolve_config(list(rest), "train", PROG, choices=option_choices())  # as given, before the mode
    if given.k is None:
        raise UserError("--k is required: the kept fraction the strategies are searched for (the budget unless "
                        "--budget), e.g. --k 0.05")
    cfg, sources = resolve_config(list(rest) + ["--exp-mode", CONFIG_MODE], "train", PROG, choices=option_choices())
    if sources["val_split"] == "default":
        cfg = dataclasses.replace(cfg, val_split=DEFAULT_REWARD_SPLIT)
    if cfg.val_split <= 0:
        raise UserError("the reward needs a held-out part of the training set: --val-split must be > 0")
    return args, cfg


# ----------------------------------------------------------------------------------------------- the masked model
def pretrained_masked_model(cfg, info, device) -> nn.Module:
    """The pretrained network with every conv/linear layer masked by weight magnitude, in eval mode, frozen.

    keep_min is 0 so that any searched ratio (at least the lower bound) is representable; under channel
    granularity the layers that read the same tensor share one rate logit (as in training)."""
    model = build_model(cfg, info, device, masked=False)
    path = source_checkpoint(cfg)
    if not os.path.isfile(path):
        raise UserError(f"pretrained checkpoint {path} does not exist (run train.py --exp-mode pretrain with the "
                        "same --dataset/--arch/--adv_loss/--result-dir first, or pass --source-net PATH)")
    load_checkpoint_into(model, path, device, keep_pruning_state=False, k=cfg.k, arch=cfg.arch, dataset=cfg.dataset)
    sparsify(model, cfg.prune_reg, keep_min=0.0)
    if cfg.prune_reg == "channel":
        tie_rates(model, inspect_layers(model, example_input(info, device)).tie_groups)
    init_scores_from_weights(model)
    model.eval().requires_grad_(False)  # the attacks need input gradients only
    return model


def shared_rates(model: nn.Module) -> Dict[str, str]:
    """{follower: owner} for layers whose rate logit is another layer's (channel ties)."""
    owners: Dict[int, str] = {}
    ties = {}
    for name, layer in masked_layers(model):
        owner = owners.setdefault(id(layer.k_score), name)
        if owner != name:
            ties[name] = owner
    return ties


def searched_layers(layers: List[SearchLayer], ties: Dict[str, str]) -> List[SearchLayer]:
    """One search layer per rate: a follower's weights and FLOPs are added to the layer whose rate it shares."""
    merged = {layer.name: layer for layer in layers if layer.name not in ties}
    for layer in layers:
        if layer.name in ties:
            owner = merged[ties[layer.name]]
            merged[owner.name] = dataclasses.replace(owner, params=owner.params + layer.params,
                                                     flops=owner.flops + layer.flops)
    return [merged[layer.name] for layer in layers if layer.name in merged]


def every_layer(rates: Dict[str, float], ties: Dict[str, str]) -> Dict[str, float]:
    return {**rates, **{follower: rates[owner] for follower, owner in ties.items()}}


# ----------------------------------------------------------------------------------------------- the reward
def make_reward(model: nn.Module, data, cfg, ties: Dict[str, str]) -> Reward:
    """Heracles' "acc+aa": natural + robust accuracy (fractions) of the masked model on the held-out split."""
    threat = threat_from_config(cfg, random_start=not cfg.const_init)

    def reward(rates: Dict[str, float]) -> Dict[str, float]:
        set_keep_rates(model, every_layer(rates, ties))
        torch.manual_seed(cfg.seed)  # the same PGD random start for every strategy
        sums = validate(model, data.val_batches(cfg.test_batch_size), attack_name=cfg.attack_eval, threat=threat,
                        show_progress=False)
        acc = accuracies(sums)
        return {"reward": (acc["natural_acc"] + acc["robust_acc"]) / 100.0, "natural_acc": acc["natural_acc"],
                "robust_acc": acc["robust_acc"]}
    return reward


def score_references(model: nn.Module, budget: float, ties: Dict[str, str], layers: List[SearchLayer], cost: str,
                     reward_fn: Reward) -> Dict[str, Dict[str, float]]:
    """The reward and cost fraction of the uniform, ERK and LAMP allocations at the budget (ERK and LAMP allocate
    weights, so under --cost flops they may spend another fraction of the FLOPs)."""
    weights = {name: layer.weight for name, layer in masked_layers(model)}
    costs = {layer.name: float(layer.params if cost == "params" else layer.flops) for layer in layers}
    scored = {}
    for rule in REFERENCE_RULES:
        rates = {name: rate for name, rate in allocate_keep_rates(rule, budget, weights).items() if name not in ties}
        spent = sum(costs[name] * rate for name, rate in rates.items()) / sum(costs.values())
        scored[f"{rule} {budget:g}"] = {**reward_fn(rates), "cost_fraction": spent}
    return scored


def check_id_is_free(strategy_file: str, strategy_id: str, cfg, layer_names: List[str]) -> None:
    """Fail before searching, not after, when the strategy file already holds this id (and no --overwrite)."""
    if cfg.overwrite or not os.path.exists(strategy_file):
        return
    try:
        existing = read_strategies(strategy_file, arch=cfg.arch, granularity=cfg.prune_reg, layer_names=layer_names)
    except UserError:  # nothing of this arch/granularity yet: the id is free (a broken file fails when saving)
        return
    if strategy_id in existing:
        raise UserError(f"{strategy_file} already has a {cfg.arch} {cfg.prune_reg} strategy {strategy_id!r}; choose "
                        "another --strategy-id or pass --overwrite")


# ----------------------------------------------------------------------------------------------- main
def run_search(args, cfg) -> Dict:
    device = resolve_device(cfg.device, cfg.gpu, cfg.no_cuda)
    budget = cfg.k if args.budget is None else args.budget
    bounds = tuple(args.bounds) if args.bounds else DEFAULT_BOUNDS[cfg.prune_reg]
    out = args.out or os.path.join(experiment_root(cfg), "search",
                                   f"{cfg.dataset.lower()}_{cfg.prune_reg}_{args.cost}_{budget:g}", args.method)
    strategy_file = args.strategy_file or os.path.join(out, "strategy.yaml")
    strategy_id = args.strategy_id or f"{args.method}_{budget:g}"
    summary_path = os.path.join(out, "summary.json")
    if os.path.exists(summary_path) and not cfg.overwrite:
        raise UserError(f"{out} already holds a finished search; pass --overwrite to replace it or --out DIR")

    seed_everything(cfg.seed)
    data = load_data(cfg, device)
    cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes or data.info.num_classes)
    model = pretrained_masked_model(cfg, data.info, device)
    ties = shared_rates(model)
    layers = searched_layers(describe_layers(model, example_input(data.info, device)), ties)
    layer_names = [name for name, _ in masked_layers(model)]
    check_id_is_free(strategy_file, strategy_id, cfg, layer_names)
    reward_fn = make_reward(model, data, cfg, ties)
    print(f"{PROG}: {args.method}, {args.episodes} episodes, budget {budget:g} of the {args.cost}, bounds "
          f"{bounds[0]:g}-{bounds[1]:g}, {len(layers)} layers; reward = natural + {cfg.attack_eval}-{cfg.num_steps} "
          f"accuracy on {data.num_val} held-out training examples", file=sys.stderr)

    started = time.time()
    shown = max(1, args.episodes // 20)

    def progress(row):
        if row["episode"] % shown == 0 or row["episode"] == args.episodes:
            print(f"episode {row['episode']}/{args.episodes}: reward {row['reward']:.4f} (natural "
                  f"{row['natural_acc']:.2f}%, robust {row['robust_acc']:.2f}%), best {row['best_reward']:.4f} "
                  f"[{time.time() - started:.0f}s]", file=sys.stderr)

    result = search_strategy(layers, budget, reward_fn, method=args.method, episodes=args.episodes, seed=cfg.seed,
                             bounds=bounds, cost=args.cost,
                             ddpg=DDPGConfig(hidden=args.ddpg_hidden, warmup=args.ddpg_warmup,
                                             batch_size=args.ddpg_batch_size),
                             evolution=EvolutionConfig(population=args.population, mutation=args.mutation),
                             on_episode=progress)
    seconds = time.time() - started
    references = score_references(model, budget, ties, layers, args.cost, reward_fn)
    best = every_layer(result.best, ties)

    os.makedirs(out, exist_ok=True)
    result.write_csv(os.path.join(out, "episodes.csv"))
    best_row = result.history[result.best_episode - 1]
    summary = {"method": args.method, "episodes": args.episodes, "budget": budget, "cost": args.cost,
               "bounds": list(bounds), "seed": cfg.seed, "arch": cfg.arch, "dataset": cfg.dataset,
               "prune_reg": cfg.prune_reg, "source": source_checkpoint(cfg), "reward_examples": data.num_val,
               "attack": f"{cfg.attack_eval}-{cfg.num_steps}", "epsilon": cfg.epsilon, "seconds": round(seconds, 1),
               "stg_id": f"{strategy_file}:{strategy_id}",
               "best": {"episode": result.best_episode, "reward": result.best_reward,
                        "natural_acc": best_row["natural_acc"], "robust_acc": best_row["robust_acc"],
                        "cost_fraction": best_row["cost_fraction"], "keep": best},
               "references": references}
    write_json(summary_path, summary)  # before the strategy file: a failure to merge into it loses no result
    save_strategies(strategy_file, {strategy_id: best}, arch=cfg.arch, granularity=cfg.prune_reg,
                    layer_names=layer_names, overwrite=cfg.overwrite)
    return summary


def summary_table(summary: Dict) -> str:
    lines = [f"{'strategy':<24}{'reward':>8}{'natural %':>11}{'robust %':>10}{'cost':>8}"]
    best = summary["best"]
    rows = [(f"{summary['method']} (episode {best['episode']})", best)] + list(summary["references"].items())
    for name, row in rows:
        lines.append(f"{name:<24}{row['reward']:>8.4f}{row['natural_acc']:>11.2f}{row['robust_acc']:>10.2f}"
                     f"{row['cost_fraction']:>8.4f}")
    keep = ", ".join(f"{name}={rate:.4f}" for name, rate in best["keep"].items())
    lines += [f"best keep per layer: {keep}", f"searched {summary['episodes']} episodes in {summary['seconds']:.0f}s",
              f"use it: --stg_id {summary['stg_id']}"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging(None, level=logging.WARNING)  # warnings only: the progress lines are this script's own
    try:
        args, cfg = parse(argv)
        summary = run_search(args, cfg)
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(summary_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
