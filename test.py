"""Robust evaluation of a trained run: natural accuracy and attacks, written to a result JSON.

    python test.py --arch vgg16_bn --dataset CIFAR10 --exp-mode harp_finetune --k 0.01 --prune_reg weight --stg_id 010_uni

finds the run's best checkpoint (the same run directory train.py used), rebuilds the model from the config
stored in it, and evaluates it on the whole test set (or the first --n-examples) under --attacks (`--attacks help`
lists them: trainers/evaluation/). Every attack's settings are checked against the model before anything runs.
Results go to <run dir>/eval/<checkpoint stem>_<attack preset>.json and, with --results-file, to a chosen path too
(trainers/evaluation/report.py). If an attack fails, the finished ones are written, marked incomplete, and the
same command again runs only the missing ones.

Also evaluates checkpoints of the original HARP/Hydra code (--source-net PATH: a state_dict with popup_scores
and k_score, possibly under a `module.` prefix, no stored config: --arch/--dataset/--k/--alpha/--prune_reg
describe it) and dense exports (*_dense.pth.tar, or any state_dict without scores: a plain model).
"""
import dataclasses
import logging
import os
import sys
from typing import Dict, List, Tuple

from configs.cli import resolve_config
from configs.errors import UserError
from pruning.wrap import model_sparsity
from stage import (adopt_checkpoint, build_evaluated_model, checkpoint_kind, evaluation_threat, load_data,
                   option_choices)
from trainers.evaluation.ap_protocol import AP_PRESET, ap_config, preset_attacks
from trainers.evaluation.registry import EvalContext, EvalSettings, attack_help, attack_options, wants_help
from trainers.evaluation.report import (Evaluated, assemble, finished_entries, log_summary, result_path,
                                        write_result)
from trainers.evaluation.suite import IncompleteSuite, parse_epsilons, run_suite
from utils.checkpoint import load_checkpoint
from utils.device import resolve_device
from utils.logging import setup_logging
from utils.run_dir import eval_dir_for, evaluated_checkpoint

log = logging.getLogger("test")


def evaluate_checkpoint(argv: List[str], cfg, sources: Dict[str, str]) -> Tuple[Dict, str]:
    """Run the whole evaluation of the resolved command line; returns the result dict and the path of its JSON."""
    attacks, epsilons = preset_attacks(cfg.attacks, cfg.attack_preset), parse_epsilons(cfg.epsilons)
    path = evaluated_checkpoint(cfg)
    device = resolve_device(cfg.device, cfg.gpu, cfg.no_cuda)
    ckpt = load_checkpoint(path, map_location=device)
    cfg, sources = adopt_checkpoint(argv, cfg, sources, ckpt, path)
    setup_logging(os.path.join(eval_dir_for(path), "test.log"))
    kind, epoch = checkpoint_kind(ckpt, path), ckpt.get("epoch")
    log.info("loaded checkpoint %s%s: %s", path, f" (epoch {epoch})" if epoch is not None else "", kind.label)

    data = load_data(cfg, device)
    cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes or data.info.num_classes)
    deviations = None
    if cfg.attack_preset == AP_PRESET:  # the benchmark's threat model, points and batches
        cfg, deviations = ap_config(cfg, sources)
    model = build_evaluated_model(cfg, data.info, ckpt, path, device)
    sparsity = model_sparsity(model)
    log.info("%s %s, %s: kept %d of %d prunable weights (%.4f%%, sparsity %.4f%%)", cfg.arch, cfg.exp_mode,
             sparsity["counted"], sparsity["kept"], sparsity["total"], 100 * sparsity["global_keep"],
             100 * sparsity["sparsity"])
    if kind.masked:
        log.info("per-layer keep: %s", ", ".join(f"{n}={v['keep']:.4f}" for n, v in sparsity["per_layer"].items()))

    threat = evaluation_threat(cfg, sources)
    batch = cfg.eval_batch_size or cfg.test_batch_size
    n = data.test_count(cfg.n_examples)
    if cfg.n_examples and cfg.n_examples > n:
        log.warning("--n-examples %d: the test set has only %d examples", cfg.n_examples, n)
    target = result_path(path, cfg.attack_preset)
    context = EvalContext(data=data, device=device, artifact_stem=os.path.splitext(target)[0])
    settings = EvalSettings(threat=threat, seed=cfg.seed, num_classes=cfg.num_classes, preset=cfg.attack_preset,
                            balanced=data.info.balanced_accuracy, show_progress=not cfg.no_progress)
    evaluated = Evaluated(cfg, path, kind.label, epoch, threat, sparsity, context, batch,
                          ckpt["config"] if kind.own else None, deviations, ckpt.get("budget"))
    log.info("evaluating %d examples of %s: %s (eps %g, %s, step %g, seed %d, preset %s)", n, cfg.dataset,
             ", ".join(attacks), threat.eps, threat.norm, threat.step_size, cfg.seed, cfg.attack_preset)
    try:
        suite = run_suite(model, lambda: data.test_batches(batch, limit=cfg.n_examples), attacks, settings,
                          num_batches=data.num_batches("test", batch, limit=cfg.n_examples), epsilons=epsilons,
                          curve_steps=cfg.num_steps, options=attack_options(attacks, cfg, context), points=n,
                          finished=finished_entries(target, evaluated))
    except IncompleteSuite as stop:
        write_result(assemble(evaluated, stop.suite), target, cfg.results_file)
        log.error("%s failed; the finished attacks are in %s (marked incomplete): the same command runs the rest",
                  stop.suite["incomplete"]["failed"], target)
        raise stop.cause from None
    result = assemble(evaluated, suite)
    log_summary(result)
    write_result(result, target, cfg.results_file)
    return result, target


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        setup_logging(None)
        cfg, sources = resolve_config(argv, "test", "test.py", choices=option_choices())
        if wants_help(cfg.attacks):
            print("\n".join(attack_help()))
        else:
            evaluate_checkpoint(argv, cfg, sources)
        return 0
    except UserError as err:
        print(f"test.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
