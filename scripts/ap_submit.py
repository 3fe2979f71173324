"""Submission kit for the Adversarial Pruning (AP) benchmark (pralab/AdversarialPruningBenchmark).

    python test.py --source-net RUN/checkpoint/model_best.pth.tar --attack-preset ap      # the benchmark's evaluation
    python scripts/ap_submit.py RUN/checkpoint/model_best.pth.tar --ap-method HARP_Zhao2023Holistic [--output DIR]

prints the benchmark's model key `{method}_{R18|V16}_{CIFAR10|SVHN}_{US|S}_{sparsity}` (the benchmark's README
§B.5) and writes into DIR (default: <run dir>/ap_submission):

    {key}.pt       {"state_dict": ...}: every mask folded into its weight (pruned weights are zeros), no scores or
                   rates, no `module.` prefix; loads with strict=True into the benchmark's base models
                   (base_resnet18.resnet18() / base_vgg16.vgg16_bn(), §B.8) and gives the evaluated model's logits
    {key}.pickle   the HO-FMN distances as the benchmark pickles them: a list of 0-dim float32 tensors of the
                   attacked points, in order, with points FMN never broke at 0
    {key}.txt      the block to paste into the benchmark's "New AP method" issue (model and distances links to
                   fill in, clean accuracy and AutoAttack robust accuracy in percent, HO-FMN robust accuracy as the
                   fraction the benchmark computes, and the normalisation / architecture statement)

The numbers come from test.py's `--attack-preset ap` result of the same checkpoint (<run dir>/eval/<stem>_ap.json,
or --result). The sparsity level in the key is the one the run asked for, 100 * (1 - k), confirmed by the weight
sparsity the result measured (`sparsity.global_keep`): more than SPARSITY_TOLERANCE_PP points apart is refused with
both numbers (HARP's channel k sets a FLOPs target, so its weight sparsity is not 1 - k); --sparsity sets the level
instead. It must be one of the benchmark's levels: 90, 95, 99 unstructured (weight pruning, US), 50, 75, 90
structured (channel pruning, S). Architectures: resnet18 (R18) and vgg16_bn (V16), 10 classes, no in-model
normalisation.

Nothing is written unless the numbers can be defended: the result must be complete, newer than the checkpoint, on
its budget target (`budget.on_target`), its HO-FMN fraction must be what its distances give, and its protocol record
must list no deviation (--allow-deviations writes them anyway, under a key ending in DEVIATING_SUFFIX).
"""
import argparse
import dataclasses
import os
import pickle
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from configs.errors import UserError  # noqa: E402
from configs.schema import Config  # noqa: E402
from data.info import dataset_info  # noqa: E402
from pruning.budget import describe_budget  # noqa: E402
from models import create_model  # noqa: E402
from pruning.wrap import dense_state_dict  # noqa: E402
from stage import build_evaluated_model  # noqa: E402
from trainers.evaluation.ap_protocol import AP_EPS, AP_PRESET  # noqa: E402
from trainers.evaluation.minimum_norm import counted_distances, read_distances, resolve_distances_file  # noqa: E402
from trainers.evaluation.report import read_result, written_after_checkpoint  # noqa: E402
from trainers.evaluation.report import result_path as ap_result_file  # noqa: E402
from utils.atomic import atomic_write  # noqa: E402
from utils.checkpoint import load_checkpoint, save_atomic  # noqa: E402
from utils.run_dir import eval_dir_for  # noqa: E402

ARCH_CODES = {"resnet18": "R18", "vgg16_bn": "V16"}
BASE_MODELS = {"resnet18": "base_resnet18.resnet18()", "vgg16_bn": "base_vgg16.vgg16_bn()"}
DATASETS = ("CIFAR10", "SVHN")
STRUCTURES = {"weight": "US", "channel": "S"}                  # filters and channels are both S in the benchmark
LEVELS = {"US": ("90", "95", "99"), "S": ("50", "75", "90")}
# The taxonomy's ap_key: Name_AuthorYearWord; load_model cuts a key at its third underscore, so exactly one here.
AP_METHOD = re.compile(r"^[A-Za-z0-9-]+_[A-Za-z-]+[0-9]{4}[A-Za-z0-9-]+$")
CHECK_INPUTS, CHECK_SEED = 8, 0
CHECK_TOLERANCE = 1e-5
SPARSITY_TOLERANCE_PP = 1.0      # measured weight sparsity vs the level asked for, percentage points
HOFMN_DECIMALS = 7               # protocol.numbers rounds HO-FMN's fraction to 7 decimals (ap_protocol)
DEVIATING_SUFFIX = "_deviating"  # the key of a submission whose evaluation deviates from the protocol


@dataclass
class Submission:
    key: str
    checkpoint_file: str
    distances_file: str
    text_file: str
    text: str
    deviations: List[str]     # allowed by --allow-deviations (the key says so)
    measured_sparsity: float  # percent of the prunable weights pruned, as the result measured it
    level: str                # the key's level


# ----------------------------------------------------------------------------------------------- the key
def model_key(ap_method: str, arch: str, dataset: str, prune_reg: str, sparsity: str) -> str:
    """The benchmark's `model_key_maker`: {ap_method}_{R18|V16}_{CIFAR10|SVHN}_{US|S}_{sparsity}."""
    if not AP_METHOD.match(ap_method):
        raise UserError(f"--ap-method {ap_method!r} is not a taxonomy key Name_AuthorYearWord (e.g. "
                        "HARP_Zhao2023Holistic): one underscore, the author, the year and a word")
    if arch not in ARCH_CODES:
        raise UserError(f"the benchmark's base models are {' and '.join(ARCH_CODES)}; this model is {arch}")
    if dataset not in DATASETS:
        raise UserError(f"the benchmark covers {' and '.join(DATASETS)}; this model was trained on {dataset}")
    structure = STRUCTURES[prune_reg]
    if sparsity not in LEVELS[structure]:
        raise UserError(f"sparsity {sparsity} is not a level of the benchmark for {structure} "
                        f"({', '.join(LEVELS[structure])}); pass --sparsity with the level this model targets")
    return f"{ap_method}_{ARCH_CODES[arch]}_{dataset}_{structure}_{sparsity}"


def measured_sparsity(result: Dict, path: str) -> float:
    """100 * (1 - global_keep): percent of the prunable weights the evaluated model pruned."""
    try:
        return 100.0 * (1.0 - float(result["sparsity"]["global_keep"]))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} records no measured sparsity (sparsity.global_keep); evaluate again") from None


def sparsity_label(k: Optional[float], override: Optional[str], measured: float) -> str:
    """--sparsity, else 100 * (1 - k) as an integer percentage ('99' for k = 0.01), provided the measured sparsity
    (percent) is within SPARSITY_TOLERANCE_PP of it."""
    if override is not None:
        return str(override)
    if k is None:
        raise UserError("a dense model has no sparsity level; pass --sparsity if it is a pruned model's export")
    percent = 100.0 * (1.0 - k)
    if abs(percent - round(percent)) > 1e-6:
        raise UserError(f"k {k} gives sparsity {percent:g}%, not a whole percentage; pass --sparsity")
    if abs(measured - percent) > SPARSITY_TOLERANCE_PP:
        raise UserError(f"the model is {measured:.2f} % sparse, not the {percent:g} % that k {k:g} asks for; pass "
                        "--sparsity LEVEL if that is the level it targets (channel k is a FLOPs target)")
    return str(int(round(percent)))


# ----------------------------------------------------------------------------------------------- the model
def _stored_config(ckpt: Dict, path: str) -> Config:
    stored = ckpt.get("config")
    if not isinstance(stored, dict):
        raise UserError(f"{path} has no stored config: give a checkpoint written by this toolkit's train.py")
    known = {f.name for f in dataclasses.fields(Config)}
    return dataclasses.replace(Config(), **{k: v for k, v in stored.items() if k in known})


def evaluated_model(path: str) -> Tuple[nn.Module, Config]:
    """The model test.py evaluates for this checkpoint (masked if it has scores, masks frozen), on the CPU."""
    ckpt = load_checkpoint(path)
    cfg = _stored_config(ckpt, path)
    info = dataset_info(cfg.dataset)
    cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes or info.num_classes)
    return build_evaluated_model(cfg, info, ckpt, path, torch.device("cpu")), cfg


def benchmark_state_dict(model: nn.Module, cfg: Config) -> Dict[str, torch.Tensor]:
    """The dense state dict, checked: strict load into the plain architecture and the same logits."""
    if cfg.normalize:
        raise UserError("the model normalises its inputs (--normalize); the benchmark's base models take raw [0, 1] "
                        "inputs, so this checkpoint cannot be submitted as a base model")
    if cfg.num_classes != 10:
        raise UserError(f"the benchmark's base models have 10 classes; this model has {cfg.num_classes}")
    state = dense_state_dict(model)
    plain = create_model(cfg.arch, num_classes=10, in_channels=3, normalize=False).eval()
    plain.load_state_dict(state, strict=True)
    x = torch.rand(CHECK_INPUTS, 3, 32, 32, generator=torch.Generator().manual_seed(CHECK_SEED))
    with torch.no_grad():
        if not torch.allclose(plain(x), model(x), rtol=CHECK_TOLERANCE, atol=CHECK_TOLERANCE):
            raise UserError("the dense export does not reproduce the evaluated model's logits")
    return state


# ----------------------------------------------------------------------------------------------- the numbers
def load_ap_result(path: str, checkpoint: str, explicit: bool) -> Dict:
    if not os.path.isfile(path):
        raise UserError(f"no AP evaluation of {checkpoint} at {path}; run python test.py --source-net {checkpoint} "
                        f"--attack-preset {AP_PRESET} first")
    result = read_result(path, complete=True)
    if result.get("preset") != AP_PRESET or "protocol" not in result:
        raise UserError(f"{path} is not a test.py --attack-preset {AP_PRESET} result")
    if explicit and os.path.abspath(result.get("checkpoint", "")) != os.path.abspath(checkpoint):
        raise UserError(f"{path} evaluated {result.get('checkpoint')}, not {checkpoint}")
    numbers = result["protocol"]["numbers"]
    missing = [name for name, key in (("autoattack", "robust_accuracy_aa"), ("fmn", "robust_accuracy_hofmn"))
               if numbers.get(key) is None]
    if missing:
        raise UserError(f"{path} lacks {' and '.join(missing)}; rerun test.py --attack-preset {AP_PRESET} with "
                        "--attacks all")
    return result


def check_trustworthy(result: Dict, path: str, checkpoint: str, allow_deviations: bool) -> List[str]:
    """Refuse a result whose numbers cannot be defended: older than the checkpoint, off its budget target, or
    deviating from the protocol (unless allowed). Returns the deviations allowed."""
    if not written_after_checkpoint(path, checkpoint):
        raise UserError(f"{path} is older than {checkpoint}: evaluate it again (python test.py --source-net "
                        f"{checkpoint} --attack-preset {AP_PRESET})")
    budget = result.get("budget")
    if budget and not budget.get("on_target", True):
        raise UserError(f"the model is off target: {describe_budget(budget)}; retrain with the preset's gamma or "
                        "--target-floor")
    deviations = list(result["protocol"].get("deviations", []))
    if deviations and not allow_deviations:
        raise UserError(f"the evaluation deviates from the protocol ({len(deviations)}): {deviations[0]}; fix it, or "
                        "pass --allow-deviations for a key marked as deviating")
    return deviations


def benchmark_distances(result_path: str, result: Dict) -> List[torch.Tensor]:
    """HO-FMN's distances list: 0-dim float32 tensors, failures as 0 (the run's own counting under the preset),
    refused unless the fraction above 8/255 they give is the result's HO-FMN number."""
    record = read_distances(resolve_distances_file(result_path, result["attacks"]["fmn"]))
    counted = counted_distances(record)
    robust = int((counted > AP_EPS).sum())
    fraction = round(robust / max(counted.numel(), 1), HOFMN_DECIMALS)
    stated = result["protocol"]["numbers"]["robust_accuracy_hofmn"]
    if abs(fraction - float(stated)) > 10 ** -HOFMN_DECIMALS:
        raise UserError(f"{result_path}: HO-FMN robust accuracy {stated} does not match its distances ({robust} of "
                        f"{counted.numel()} above 8/255: {fraction:g}); evaluate again")
    return [torch.tensor(d, dtype=torch.float32) for d in counted.tolist()]


def paste_block(key: str, numbers: Dict[str, float], arch: str, deviations: Sequence[str] = ()) -> str:
    """The results section of the benchmark's "New AP method" issue template, filled in for one model."""
    lines = [
        f"## Evaluation Results of Model {key}",
        "",
        f'_Model GDrive:_ "{key}" : ["your_gdrive_link_id", ".pt"]',
        f'_Distances GDrive:_ "{key}" : ["your_gdrive_link_id", ".pickle"]',
        "",
        f"_Clean Accuracy:_ {numbers['clean_accuracy']:.2f}",
        f"_Robust Accuracy (AA):_ {numbers['robust_accuracy_aa']:.2f}",
        f"_Robust Accuracy (HO-FMN):_ {numbers['robust_accuracy_hofmn']}",
        "",
        "## Architecture details and normalization",
        f"No normalization: the model takes raw [0, 1] inputs. The checkpoint loads with strict=True into "
        f"{BASE_MODELS[arch]} (dense weights, pruned weights stored as zeros).",
        "",
    ]
    if deviations:
        lines += ["## Deviations from the benchmark's protocol", ""] + [f"- {d}" for d in deviations] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the kit
def submit(checkpoint: str, ap_method: str, output: Optional[str] = None, result_path: Optional[str] = None,
           sparsity: Optional[str] = None, allow_deviations: bool = False) -> Submission:
    """Check everything (module docstring), then write the three files and return what was written."""
    model, cfg = evaluated_model(checkpoint)
    state = benchmark_state_dict(model, cfg)
    result_file = result_path or ap_result_file(checkpoint, AP_PRESET)
    result = load_ap_result(result_file, checkpoint, explicit=result_path is not None)
    deviations = check_trustworthy(result, result_file, checkpoint, allow_deviations)
    measured = measured_sparsity(result, result_file)
    level = sparsity_label(cfg.k, sparsity, measured)
    key = model_key(ap_method, cfg.arch, cfg.dataset, cfg.prune_reg, level) + (DEVIATING_SUFFIX if deviations else "")
    distances = benchmark_distances(result_file, result)
    folder = output or os.path.join(os.path.dirname(eval_dir_for(checkpoint)), "ap_submission")
    paths = [os.path.join(folder, f"{key}{ext}") for ext in (".pt", ".pickle", ".txt")]
    save_atomic({"state_dict": state}, paths[0])
    atomic_write(paths[1], lambda fh: pickle.dump(distances, fh), binary=True)
    text = paste_block(key, result["protocol"]["numbers"], cfg.arch, deviations)
    atomic_write(paths[2], lambda fh: fh.write(text))
    return Submission(key, *paths, text, deviations, measured, level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ap_submit.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("checkpoint", help="the evaluated checkpoint (e.g. RUN/checkpoint/model_best.pth.tar)")
    parser.add_argument("--ap-method", required=True, help="the taxonomy's ap_key, e.g. HARP_Zhao2023Holistic")
    parser.add_argument("--output", default=None, help="folder for the files (default: <run dir>/ap_submission)")
    parser.add_argument("--result", default=None, help="test.py --attack-preset ap result JSON (default: "
                        "<run dir>/eval/<checkpoint stem>_ap.json)")
    parser.add_argument("--sparsity", default=None, help="the key's sparsity level (default: 100 * (1 - k), if the "
                        f"measured sparsity is within {SPARSITY_TOLERANCE_PP:g} point of it)")
    parser.add_argument("--allow-deviations", action="store_true", help="write a submission even though the "
                        f"evaluation deviates from the protocol (its key ends in {DEVIATING_SUFFIX})")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        done = submit(args.checkpoint, args.ap_method, args.output, args.result, args.sparsity,
                      args.allow_deviations)
    except UserError as err:
        print(f"ap_submit.py: error: {err}", file=sys.stderr)
        return 2
    for deviation in done.deviations:
        print(f"ap_submit.py: warning: the evaluation deviates from the benchmark's protocol: {deviation}",
              file=sys.stderr)
    if abs(done.measured_sparsity - float(done.level)) > SPARSITY_TOLERANCE_PP:
        print(f"ap_submit.py: warning: keyed at level {done.level} (--sparsity); the weights are "
              f"{done.measured_sparsity:.2f} % sparse", file=sys.stderr)
    print(done.key)
    print(f"checkpoint: {done.checkpoint_file}\ndistances:  {done.distances_file}\npaste text: {done.text_file}\n")
    print(done.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
