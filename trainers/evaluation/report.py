"""test.py's result JSON: its schema and version, how it is assembled, summarised, written (with the per-point files
its entries name), read back and resumed. Every reader (tables, plots, the AP submission kit, plan collection and
plan states) goes through `read_result`, which refuses a format it does not know.

A result is one JSON object (format RESULT_FORMAT_VERSION):

    format_version, [incomplete]        the schema version; `incomplete` only while some attacks are missing:
                                        {'failed', 'error', 'missing'} (suite.IncompleteSuite)
    arch, dataset, exp_mode, k, prune_reg, stg_id, alpha, normalize, num_classes
    checkpoint, checkpoint_kind, epoch  what was evaluated
    preset, seed, norm, epsilon, step_size, n_examples
    natural_acc, natural_stderr, [natural_balanced_acc]
    attacks                             {name: entry} (trainers/evaluation/scoring.result_entry and each attack)
    [security_curve], gradient_masking, [protocol] (the AP preset: ap_protocol.protocol_record)
    sparsity, budget (pruned: pruning.budget.budget_record from the checkpoint, else None)
    seconds, natural_seconds, batch_size, autoattack_batch_size, device, date, versions
    config, train_config                the evaluation's config and the one the model was trained with

An incomplete result is resumed by a rerun with the same settings: `finished_entries` hands its entries back to
the suite, which runs only the missing attacks, so the final JSON is the one an uninterrupted run writes.
"""
import datetime
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from configs.errors import UserError
from configs.schema import config_to_dict
from trainers.attacks.threat import ThreatModel
from trainers.evaluation.ap_protocol import protocol_record
from trainers.evaluation.autoattack import AutoAttackOptions
from trainers.evaluation.certified import verified_comparison
from trainers.evaluation.registry import ATTACKS, EvalContext, attack_names
from utils.logging import write_json
from utils.run_dir import checkpoint_stem, eval_dir_for
from utils.versions import versions

log = logging.getLogger(__name__)

RESULT_FORMAT_VERSION = 1
INCOMPLETE = "incomplete"
# What makes a JSON file a test.py result (other JSON files in a result tree are skipped by readers).
RESULT_KEYS = ("arch", "dataset", "exp_mode", "natural_acc", "attacks", "sparsity")


def result_path(checkpoint: str, preset: str) -> str:
    """Where test.py writes the result of `checkpoint` under an attack preset: <run dir>/eval/<stem>_<preset>.json."""
    return os.path.join(eval_dir_for(checkpoint), f"{checkpoint_stem(checkpoint)}_{preset}.json")


@dataclass(frozen=True)
class Evaluated:
    """What was evaluated and how: everything of a result besides the suite's numbers."""
    cfg: Any                            # the evaluation's resolved Config
    checkpoint: str
    kind: str                           # e.g. 'toolkit (masked)'
    epoch: Optional[int]
    threat: ThreatModel
    sparsity: Dict[str, Any]
    context: EvalContext
    batch_size: int
    train_config: Optional[Dict[str, Any]]  # the checkpoint's own config (None for foreign checkpoints)
    deviations: Optional[List[str]] = None  # from the AP benchmark's protocol (None: another preset)
    budget: Optional[Dict[str, Any]] = None  # the checkpoint's budget record (pruning.budget.budget_record), if pruned


# ----------------------------------------------------------------------------------------------- assembly
def assemble(evaluated: Evaluated, suite: Dict[str, Any]) -> Dict[str, Any]:
    """The result JSON of a suite's output (run_suite's, or an IncompleteSuite's so far)."""
    cfg, threat = evaluated.cfg, evaluated.threat
    result: Dict[str, Any] = {"format_version": RESULT_FORMAT_VERSION}
    if INCOMPLETE in suite:
        result[INCOMPLETE] = suite[INCOMPLETE]
    result.update({
        "arch": cfg.arch, "dataset": cfg.dataset, "exp_mode": cfg.exp_mode, "k": cfg.k, "prune_reg": cfg.prune_reg,
        "stg_id": cfg.stg_id, "alpha": cfg.alpha, "normalize": cfg.normalize, "num_classes": cfg.num_classes,
        "checkpoint": evaluated.checkpoint, "checkpoint_kind": evaluated.kind, "epoch": evaluated.epoch,
        "preset": cfg.attack_preset, "seed": cfg.seed, "norm": threat.norm, "epsilon": threat.eps,
        "step_size": threat.step_size,
        "n_examples": suite["n"],
        "natural_acc": suite["natural_acc"], "natural_stderr": suite["natural_stderr"],
    })
    if "natural_balanced_acc" in suite:
        result["natural_balanced_acc"] = suite["natural_balanced_acc"]
    result["attacks"] = suite["attacks"]
    for key in ("security_curve", "gradient_masking"):
        if key in suite:
            result[key] = suite[key]
    if evaluated.deviations is not None:
        result["protocol"] = protocol_record(suite, seed=cfg.seed, deviations=evaluated.deviations)
    result.update({
        "sparsity": evaluated.sparsity,
        # target and reached keep (FLOPs ratio for channel) of the evaluated model: tables mark off-target cells
        "budget": evaluated.budget,
        "seconds": suite["seconds"], "natural_seconds": suite["natural_seconds"],
        "batch_size": evaluated.batch_size,
        # format 1 records AutoAttack's batch of survivors at the top level, whether or not it ran
        "autoattack_batch_size": AutoAttackOptions.from_config(cfg, evaluated.context).batch_size,
        "device": str(evaluated.context.device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "config": config_to_dict(cfg),
        "train_config": evaluated.train_config,  # what the model was trained with (tables group by it)
    })
    return result


def summary_lines(result: Dict) -> List[str]:
    """The table test.py logs: natural accuracy, each attack, the security curve, the verified accuracies of the
    bounds side by side."""
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
    if comparison:
        lines.append(comparison)
    if INCOMPLETE in result:
        lines.append(f"incomplete: {result[INCOMPLETE]['failed']} failed ({result[INCOMPLETE]['error']}); not run: "
                     f"{', '.join(result[INCOMPLETE]['missing']) or 'none'}")
    return lines


def log_summary(result: Dict) -> None:
    for line in summary_lines(result):
        log.info(line)
    if "protocol" in result:
        log.info("AP benchmark numbers (clean and AutoAttack in percent, HO-FMN a fraction): %s",
                 result["protocol"]["numbers"])


# ----------------------------------------------------------------------------------------------- files
def artifact_names(result: Dict) -> List[str]:
    """The per-point files the result's entries name (relative to its folder), as each attack declares them."""
    attacks = set(attack_names())
    return [entry[key] for name, entry in result["attacks"].items() if name in attacks
            for key in ATTACKS.get(name).artifacts if entry.get(key)]


def write_result(result: Dict, target: str, copy_to: Optional[str] = None) -> None:
    """The result JSON at `target` (atomically) and, with `copy_to` (--results-file), a copy there with the
    per-point files beside it."""
    write_json(target, result)
    log.info("results: %s", target)
    if not copy_to:
        return
    write_json(copy_to, result)
    from_dir, to_dir = os.path.dirname(os.path.abspath(target)), os.path.dirname(os.path.abspath(copy_to))
    if from_dir != to_dir:
        for name in artifact_names(result):
            os.makedirs(to_dir, exist_ok=True)
            shutil.copyfile(os.path.join(from_dir, name), os.path.join(to_dir, name))
    log.info("results: %s", copy_to)


# ----------------------------------------------------------------------------------------------- reading
def result_of(data: Any, path: str) -> Optional[Dict]:
    """`data` (a parsed JSON file) as a result: None when it is not a test.py result at all; a one-line UserError
    when it is one of a format this toolkit cannot read."""
    if not isinstance(data, dict) or not all(key in data for key in RESULT_KEYS):
        return None
    version = data.get("format_version")
    if version != RESULT_FORMAT_VERSION:
        raise UserError(f"{path}: result format version {version!r}; this toolkit reads version "
                        f"{RESULT_FORMAT_VERSION} (evaluate the checkpoint again with this test.py)")
    return data


def read_json(path: str) -> Any:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def read_result(path: str, *, complete: bool = False) -> Dict:
    """The test.py result at `path`; with `complete`, one whose attacks all finished."""
    result = result_of(read_json(path), path)
    if result is None:
        raise UserError(f"{path} is not a test.py result JSON")
    if complete and INCOMPLETE in result:
        raise UserError(f"{path} is incomplete (not run: {', '.join(result[INCOMPLETE]['missing']) or 'none'}; "
                        f"{result[INCOMPLETE]['failed']} failed); rerun test.py with the same flags to finish it")
    return result


def written_after_checkpoint(result: str, checkpoint: str) -> bool:
    """The result file was written after the checkpoint it evaluates was last written (False if either is
    missing): an older result describes weights that are no longer there."""
    try:
        return os.path.getmtime(result) >= os.path.getmtime(checkpoint)
    except OSError:
        return False


def is_complete_result(path: str) -> bool:
    """A readable result of a known format with every attack finished."""
    try:
        read_result(path, complete=True)
    except UserError:
        return False
    return True


def finished_entries(target: str, evaluated: Evaluated) -> Dict[str, Dict[str, Any]]:
    """The attack entries of an incomplete result at `target` written with exactly these settings (the same
    config, the same checkpoint, not rewritten since), for the suite to keep; else nothing."""
    if not os.path.isfile(target):
        return {}
    try:
        previous = read_result(target)
    except UserError:
        return {}
    same = (INCOMPLETE in previous and previous.get("checkpoint") == evaluated.checkpoint
            and written_after_checkpoint(target, evaluated.checkpoint)
            and previous.get("config") == json.loads(json.dumps(config_to_dict(evaluated.cfg))))
    if not same:
        return {}
    log.info("resuming the incomplete evaluation %s: keeping %s; running %s", target,
             ", ".join(previous["attacks"]) or "no attack", ", ".join(previous[INCOMPLETE]["missing"]) or "the rest")
    return previous["attacks"]
