"""Robust evaluation of a trained run: natural accuracy and attacks, written to a result JSON.

    python test.py --arch vgg16_bn --dataset CIFAR10 --exp-mode harp_finetune --k 0.01 --prune_reg weight --stg_id 010_uni

finds the run's best checkpoint (the same run directory train.py used), rebuilds the model from the config
stored in it, and evaluates it on the whole test set (or the first --n-examples) under --attacks:
natural, fgsm, pgd10, pgd20, pgd50, cw, apgd and autoattack (trainers/evaluation/). Results go to
<run dir>/eval/<checkpoint stem>_<attack preset>.json and, with --results-file, to a chosen path too.

Also evaluates checkpoints of the original HARP/Hydra code (--source-net PATH: a state_dict with popup_scores
and k_score, possibly under a `module.` prefix, no stored config: --arch/--dataset/--k/--alpha/--prune_reg
describe it) and dense exports (*_dense.pth.tar, or any state_dict without scores: a plain model).
"""
import dataclasses
import datetime
import logging
import os
import sys
from typing import Dict, List, Optional, Tuple

from configs.cli import preset_path, resolve_config
from configs.errors import UserError
from configs.recipes import RECIPES, mode_of_foreign_checkpoint
from configs.schema import config_to_dict
from pruning.loading import describe_state
from pruning.wrap import freeze_masks, model_sparsity
from stage import build_model, fit_checkpoint, load_data, option_choices
from trainers.attacks.threat import LINF, threat_from_config
from trainers.evaluation.ap_protocol import AP_PRESET, ap_attacks, ap_config, protocol_record
from trainers.evaluation.certified import certify_settings, verified_comparison
from trainers.evaluation.minimum_norm import copy_distances_file, fmn_settings
from trainers.evaluation.registry import EvalSettings, parse_attacks
from trainers.evaluation.suite import run_suite
from utils.checkpoint import load_checkpoint, state_dict_of
from utils.device import resolve_device
from utils.logging import setup_logging, write_json
from utils.run_dir import checkpoint_stem, eval_dir_for, evaluated_checkpoint
from utils.versions import versions

log = logging.getLogger("test")

RESULT_FORMAT_VERSION = 1
# What defines the model: taken from the config stored in one of our checkpoints.
MODEL_KEYS = ("arch", "dataset", "num_classes", "normalize", "mean", "std", "init_type", "prune_reg", "k", "alpha",
              "exp_mode", "stg_id", "image_dim", "trainer", "adv_loss", "exp_name")
# Given explicitly, these must agree with the stored config (k, alpha and prune_reg only for masked modes).
CHECKED_KEYS = ("arch", "dataset", "exp_mode", "prune_reg", "k", "alpha")


# ----------------------------------------------------------------------------------------------- config
def _explicit(sources: Dict[str, str], cfg, key: str) -> bool:
    """Set by the user (command line or their --configs file), not by a default or the dataset preset."""
    source = sources.get(key, "default")
    return source == "command line" or bool(cfg.configs and source.startswith(cfg.configs))


def parse_epsilons(text: Optional[str]) -> List[float]:
    if text is None or not str(text).strip():
        return []
    values = []
    for token in str(text).strip("[]() ").replace(" ", ",").split(","):
        if not token.strip():
            continue
        try:
            value = float(token)
        except ValueError:
            raise UserError(f"bad value {token!r} in --epsilons; give numbers separated by commas, "
                            "e.g. --epsilons 0.01,0.02,0.031") from None
        if value < 0:
            raise UserError(f"--epsilons values must be >= 0, got {value}")
        values.append(value)
    return values


def adopt_checkpoint_config(argv: List[str], cfg, sources, ckpt: Dict, path: str):
    """For one of our checkpoints, the model is described by the config stored in it, not by the flags.

    A flag given explicitly that contradicts it is an error. If the stored dataset differs from an implicit
    one (--source-net without --dataset), the config is resolved again for that dataset so its preset
    (eps, step size, batch size) applies.
    """
    stored = ckpt.get("config")
    if not isinstance(stored, dict):
        return cfg, sources
    masked = RECIPES.get(stored.get("exp_mode"), RECIPES["pretrain"]).masked
    for key in CHECKED_KEYS:
        if key in ("prune_reg", "k", "alpha") and not masked:
            continue
        if key in stored and stored[key] != getattr(cfg, key) and _explicit(sources, cfg, key):
            raise UserError(f"checkpoint {path} was trained with {key} {stored[key]!r}, not {getattr(cfg, key)!r} "
                            f"(drop --{key.replace('_', '-')} to use the checkpoint's own)")
    if stored.get("dataset") and stored["dataset"] != cfg.dataset:
        cfg, sources = resolve_config(argv + ["--dataset", stored["dataset"]], "test", "test.py",
                                      choices=option_choices())
    changes = {k: stored[k] for k in MODEL_KEYS if k in stored and k in cfg.__dataclass_fields__}
    return dataclasses.replace(cfg, **changes), sources


# ----------------------------------------------------------------------------------------------- model
def prepare_foreign(cfg, sources, state, path):
    """A checkpoint without a stored config (original HARP/Hydra code, a bare state_dict): the flags describe it;
    the granularity and a missing --exp-mode are inferred from the scores."""
    contents = describe_state(state)
    changes = {}
    if contents.has_scores:
        if contents.granularity != cfg.prune_reg:
            if _explicit(sources, cfg, "prune_reg"):
                raise UserError(f"checkpoint {path} holds {contents.granularity}-granularity scores, not --prune-reg "
                                f"{cfg.prune_reg}")
            changes["prune_reg"] = contents.granularity
            log.info("scores in %s have %s granularity", path, contents.granularity)
        if not RECIPES[cfg.exp_mode].masked:
            mode = mode_of_foreign_checkpoint(contents.has_rates)
            if _explicit(sources, cfg, "exp_mode"):
                raise UserError(f"checkpoint {path} holds pruning scores; --exp-mode {cfg.exp_mode} describes a dense "
                                f"model (use e.g. --exp-mode {mode})")
            changes["exp_mode"] = mode
            log.info("no --exp-mode given: labelling this pruned checkpoint %s", mode)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def build_and_load(cfg, info, ckpt, path, device):
    """The evaluated model (fp32, masks frozen): masked when the checkpoint carries scores, else plain."""
    masked = describe_state(state_dict_of(ckpt, path)).has_scores
    if masked and cfg.k is None:
        raise UserError(f"checkpoint {path} holds pruning scores but no config: pass --k (and --alpha) as in training")
    model = build_model(cfg, info, device, masked=masked).float()
    fit_checkpoint(model, ckpt, path, keep_pruning_state=True, k=cfg.k)
    if masked:
        freeze_masks(model)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------- output
def summary_lines(result: Dict) -> List[str]:
    lines = [f"{'attack':<12} {'eps':>8} {'accuracy %':>11}  {'± se':>5}" +
             ("  balanced %" if "natural_balanced_acc" in result else "")]

    def row(name, eps, acc, se, bal, note=""):
        text = f"{name:<12} {eps:>8} {acc:>11.2f}  {se:>5.2f}"
        if bal is not None:
            text += f"  {bal:>10.2f}"
        return text + (f"  {note}" if note else "")

    lines.append(row("natural", "-", result["natural_acc"], result["natural_stderr"],
                     result.get("natural_balanced_acc")))
    for name, entry in result["attacks"].items():
        note = ""
        if "per_component" in entry:
            note = " > ".join(f"{c} {v['robust_acc']:.2f}" for c, v in entry["per_component"].items())
        elif "median_distance" in entry:
            median = entry["median_distance"]
            note = f"median distance {'inf' if median is None else format(median, '.4g')}"
        lines.append(row(name, f"{entry['eps']:g}", entry["robust_acc"], entry["stderr"], entry.get("balanced_acc"),
                         note))
    for point in result.get("security_curve", []):
        lines.append(row(f"pgd{point['steps']} curve", f"{point['eps']:g}", point["robust_acc"], point["stderr"], None))
    comparison = verified_comparison(result["attacks"])
    return lines + ([comparison] if comparison else [])


# ----------------------------------------------------------------------------------------------- main
def evaluate_checkpoint(argv: List[str]) -> Tuple[Dict, str]:
    """Run the whole evaluation; returns the result dict and the path of its JSON."""
    cfg, sources = resolve_config(argv, "test", "test.py", choices=option_choices())
    attacks = parse_attacks(cfg.attacks)
    epsilons = parse_epsilons(cfg.epsilons)
    path = evaluated_checkpoint(cfg)
    device = resolve_device(cfg.device, cfg.gpu, cfg.no_cuda)
    ckpt = load_checkpoint(path, map_location=device)
    state = state_dict_of(ckpt, path)
    own = isinstance(ckpt.get("config"), dict)
    if own:
        cfg, sources = adopt_checkpoint_config(argv, cfg, sources, ckpt, path)
    else:
        cfg = prepare_foreign(cfg, sources, state, path)
    out_dir = eval_dir_for(path)
    setup_logging(os.path.join(out_dir, "test.log"))
    has_scores = describe_state(state).has_scores
    kind = ("toolkit" if own else "external") + (" (masked)" if has_scores else " (plain weights)")
    epoch = ckpt.get("epoch")
    log.info("loaded checkpoint %s%s: %s", path, f" (epoch {epoch})" if epoch is not None else "", kind)

    data = load_data(cfg, device)
    info = data.info
    cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes or info.num_classes)
    ap_deviations = None
    if cfg.attack_preset == AP_PRESET:  # the benchmark's threat model, points and batches
        cfg, ap_deviations = ap_config(cfg, sources)
        attacks = ap_attacks(cfg.attacks)
    model = build_and_load(cfg, info, ckpt, path, device)
    sparsity = model_sparsity(model)
    log.info("%s %s, %s: kept %d of %d prunable weights (%.4f%%, sparsity %.4f%%)", cfg.arch, cfg.exp_mode,
             sparsity["counted"], sparsity["kept"], sparsity["total"], 100 * sparsity["global_keep"],
             100 * sparsity["sparsity"])
    if has_scores:
        log.info("per-layer keep: %s", ", ".join(f"{n}={v['keep']:.4f}" for n, v in sparsity["per_layer"].items()))

    threat = threat_from_config(cfg)
    if threat.norm != LINF:
        if not _explicit(sources, cfg, "step_size"):
            threat = threat.with_(step_size=cfg.epsilon / 4)
        if not _explicit(sources, cfg, "epsilon"):
            log.warning("--distance l_2 with eps %g from %s, which is a Linf budget; pass --epsilon "
                        "(0.5 is the usual L2 budget on CIFAR-10)", cfg.epsilon, os.path.relpath(preset_path(cfg.dataset)))
    batch = cfg.eval_batch_size or cfg.test_batch_size
    aa_batch = cfg.eval_batch_size or (1000 if device.type == "cuda" and info.image_size <= 64 else cfg.test_batch_size)
    n = data.test_count(cfg.n_examples)
    if cfg.n_examples and cfg.n_examples > n:
        log.warning("--n-examples %d: the test set has only %d examples", cfg.n_examples, n)
    stem = os.path.join(out_dir, f"{checkpoint_stem(path)}_{cfg.attack_preset}")  # the result JSON without .json
    settings = EvalSettings(threat=threat, seed=cfg.seed, num_classes=cfg.num_classes, preset=cfg.attack_preset,
                            aa_batch_size=aa_batch, balanced=cfg.dataset == "SVHN", show_progress=not cfg.no_progress,
                            **fmn_settings(cfg, data, stem), **certify_settings(cfg))
    log.info("evaluating %d examples of %s: %s (eps %g, %s, step %g, seed %d, preset %s)", n, cfg.dataset,
             ", ".join(attacks), threat.eps, threat.norm, threat.step_size, cfg.seed, cfg.attack_preset)
    suite = run_suite(model, lambda: data.test_batches(batch, limit=cfg.n_examples), attacks, settings,
                      num_batches=data.num_batches("test", batch, limit=cfg.n_examples), epsilons=epsilons,
                      curve_steps=cfg.num_steps)

    result = {
        "format_version": RESULT_FORMAT_VERSION,
        "arch": cfg.arch, "dataset": cfg.dataset, "exp_mode": cfg.exp_mode, "k": cfg.k, "prune_reg": cfg.prune_reg,
        "stg_id": cfg.stg_id, "alpha": cfg.alpha, "normalize": cfg.normalize, "num_classes": cfg.num_classes,
        "checkpoint": path, "checkpoint_kind": kind, "epoch": epoch,
        "preset": cfg.attack_preset, "seed": cfg.seed, "norm": threat.norm, "epsilon": threat.eps,
        "step_size": threat.step_size,
        "n_examples": suite["n"],
        "natural_acc": suite["natural_acc"], "natural_stderr": suite["natural_stderr"],
    }
    if "natural_balanced_acc" in suite:
        result["natural_balanced_acc"] = suite["natural_balanced_acc"]
    result["attacks"] = suite["attacks"]
    if "security_curve" in suite:
        result["security_curve"] = suite["security_curve"]
    result["gradient_masking"] = suite["gradient_masking"]
    if ap_deviations is not None:
        result["protocol"] = protocol_record(suite, seed=cfg.seed, deviations=ap_deviations)
    result.update({
        "sparsity": sparsity,
        "seconds": suite["seconds"], "natural_seconds": suite["natural_seconds"],
        "batch_size": batch, "autoattack_batch_size": aa_batch, "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "config": config_to_dict(cfg),
        "train_config": ckpt.get("config") if own else None,  # what the model was trained with (tables group by it)
    })
    for line in summary_lines(result):
        log.info(line)
    if "protocol" in result:
        log.info("AP benchmark numbers (clean and AutoAttack in percent, HO-FMN a fraction): %s",
                 result["protocol"]["numbers"])
    target = f"{stem}.json"
    write_json(target, result)
    log.info("results: %s", target)
    if cfg.results_file:
        write_json(cfg.results_file, result)
        copy_distances_file(result, out_dir, os.path.dirname(os.path.abspath(cfg.results_file)))
        log.info("results: %s", cfg.results_file)
    return result, target


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        setup_logging(None)
        evaluate_checkpoint(argv)
        return 0
    except UserError as err:
        print(f"test.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
