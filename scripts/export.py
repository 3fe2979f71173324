"""Export a trained run's checkpoint in its physically small form, from the config stored in the checkpoint.

    python scripts/export.py --arch vgg16_bn --dataset CIFAR10 --exp-mode harp_finetune --k 0.5 --prune-reg channel \
        --stg-id original --speed-batch 32
    python scripts/export.py --source-net RUN/checkpoint/model_best.pth.tar

The run is named by the flags that name it for test.py (or --source-net PATH, --checkpoint best|last); the model is
rebuilt from the config its checkpoint stores (stage.build_model, stage.fit_checkpoint) with the masks frozen.

- Channel granularity: pruning.compact.compact_model removes the pruned channels (through BatchNorm, residual
  additions and the classifier) and the plain model is saved as a torch.export program with a dynamic batch size
  (<run>/export/<checkpoint>_compact.pt2), which `torch.export.load(path).module()` runs without this toolkit; with
  --torchscript as TorchScript instead (<run>/export/<checkpoint>_compact.pt, `torch.jit.load`; torch deprecates
  it and warns). Reported: MACs and parameters before and after, the largest
  logit difference of the reloaded file against the masked model (fp32, eval mode, random inputs), and with
  --speed-batch N the CPU forward time of the dense network against the compact one at batch N.
- Weight granularity: pruning.compact.save_sparse_checkpoint stores the masked weights with their zeros implicit
  (<run>/export/<checkpoint>_sparse.pth; read it with pruning.compact.load_sparse_checkpoint, which gives the dense
  state dict that loads strictly into the plain architecture). Reported: its bytes against a dense state-dict
  file's, and the logit difference of the reloaded weights.

The report is printed and written beside the export as JSON (<export>.json).
"""
import argparse
import dataclasses
import io
import json
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from configs.cli import resolve_config  # noqa: E402
from configs.errors import UserError  # noqa: E402
from configs.schema import Config  # noqa: E402
from data.info import dataset_info  # noqa: E402
from pruning.compact import compact_model, count_macs, load_sparse_checkpoint, save_compact, \
    save_sparse_checkpoint  # noqa: E402
from pruning.layers import WEIGHT  # noqa: E402
from pruning.loading import describe_state  # noqa: E402
from pruning.wrap import RATE_KEY, SCORE_KEY, dense_state_dict, freeze_masks, masked_layers  # noqa: E402
from stage import build_model, example_input, fit_checkpoint, option_choices  # noqa: E402
from utils.atomic import atomic_write  # noqa: E402
from utils.checkpoint import load_checkpoint, state_dict_of  # noqa: E402
from utils.run_dir import checkpoint_stem, eval_dir_for, evaluated_checkpoint  # noqa: E402

CHECK_BATCH = 8     # random inputs on which the export's logits are compared with the masked model's
WARMUP_ROUNDS, TIMED_ROUNDS = 2, 7


def load_trained_model(path: str, device: torch.device = torch.device("cpu")) -> Tuple[nn.Module, Config]:
    """The model of one of our checkpoints, built from the config stored in it, masks frozen, in eval mode."""
    ckpt = load_checkpoint(path, map_location=device)
    stored = ckpt.get("config")
    if not isinstance(stored, dict):
        raise UserError(f"{path} holds no config: export needs a checkpoint written by train.py")
    fields = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in stored.items() if k in fields})
    info = dataset_info(cfg.dataset, cfg.image_dim)
    cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes or info.num_classes)
    masked = describe_state(state_dict_of(ckpt, path)).has_scores
    model = build_model(cfg, info, device, masked=masked).float()
    fit_checkpoint(model, ckpt, path, keep_pruning_state=True, k=cfg.k)
    if masked:
        freeze_masks(model)
    return model.eval(), cfg


def _inputs(cfg: Config, batch: int, device: torch.device) -> torch.Tensor:
    info = dataset_info(cfg.dataset, cfg.image_dim)
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, info.in_channels, info.image_size, info.image_size, generator=generator).to(device)


def _max_abs_diff(expected: nn.Module, actual, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((expected(x) - actual(x)).abs().max())


def export_compact(model: nn.Module, cfg: Config, path: str, speed_batch: int = 0, torchscript: bool = False) -> Dict:
    """Compact a channel-pruned model, save it at `path` (a torch.export program, or TorchScript with
    `torchscript`), and report what it saves; the logits are those of the file as loaded back."""
    device = next(model.parameters()).device
    example = example_input(dataset_info(cfg.dataset, cfg.image_dim), device)
    compact = compact_model(model, example)
    save_compact(compact, example, path, torchscript=torchscript)
    loaded = torch.jit.load(path, map_location=device) if torchscript else torch.export.load(path).module()
    x = _inputs(cfg, CHECK_BATCH, device)
    macs, compact_macs = count_macs(model, example), count_macs(compact, example)
    weights = sum(p.numel() for name, p in model.named_parameters() if not name.endswith((SCORE_KEY, RATE_KEY)))
    report = {"kind": "compact", "format": "torchscript" if torchscript else "torch.export", "file": path,
              "bytes": os.path.getsize(path), "macs": macs, "compact_macs": compact_macs,
              "mac_ratio": macs / compact_macs, "params": weights,
              "compact_params": sum(p.numel() for p in compact.parameters()),
              "max_abs_diff": _max_abs_diff(model, loaded, x)}
    if speed_batch:
        from scripts.benchmark import compact_speedup  # timing protocol shared with the benchmark

        plain = build_model(dataclasses.replace(cfg, exp_mode="pretrain"), dataset_info(cfg.dataset, cfg.image_dim),
                            device, masked=False)
        plain.load_state_dict(dense_state_dict(model), strict=True)
        timing = compact_speedup(plain.eval(), compact, _inputs(cfg, speed_batch, device), warmup=WARMUP_ROUNDS,
                                 repeats=TIMED_ROUNDS, device=device)
        report.update(speed_batch=speed_batch, threads=torch.get_num_threads(), **timing)
    return report


def export_sparse(model: nn.Module, cfg: Config, path: str) -> Dict:
    """Save a weight-pruned model's dense state dict with its zeros implicit, and report the saving."""
    state = dense_state_dict(model)
    save_sparse_checkpoint(state, path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    device = next(model.parameters()).device
    plain = build_model(dataclasses.replace(cfg, exp_mode="pretrain"), dataset_info(cfg.dataset, cfg.image_dim),
                        device, masked=False)
    plain.load_state_dict(load_sparse_checkpoint(path), strict=True)
    x = _inputs(cfg, CHECK_BATCH, device)
    return {"kind": "sparse", "file": path, "bytes": os.path.getsize(path), "dense_bytes": buffer.tell(),
            "bytes_ratio": os.path.getsize(path) / buffer.tell(), "max_abs_diff": _max_abs_diff(model, plain.eval(), x)}


def default_output(checkpoint: str, granularity: str, torchscript: bool = False) -> str:
    """<run>/export/<checkpoint stem>_compact.pt2 (channel; _compact.pt as TorchScript) or _sparse.pth (weight),
    beside the run's eval/."""
    folder = os.path.join(os.path.dirname(eval_dir_for(checkpoint)), "export")
    suffix = "_sparse.pth" if granularity == WEIGHT else "_compact.pt" if torchscript else "_compact.pt2"
    return os.path.join(folder, checkpoint_stem(checkpoint) + suffix)


def export_checkpoint(path: str, output: Optional[str] = None, speed_batch: int = 0,
                      torchscript: bool = False) -> Dict:
    """Export one checkpoint (a compact program, torch.export or with `torchscript` TorchScript, or a sparse file,
    by its granularity); returns the report, also written to <export>.json."""
    model, cfg = load_trained_model(path)
    layers = masked_layers(model)
    if not layers:
        raise UserError(f"{path} holds a dense model ({cfg.exp_mode}): there is nothing pruned to export")
    granularity = layers[0][1].granularity
    output = output or default_output(path, granularity, torchscript)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if granularity == WEIGHT:
        report = export_sparse(model, cfg, output)
    else:
        report = export_compact(model, cfg, output, speed_batch, torchscript)
    report.update(checkpoint=path, arch=cfg.arch, dataset=cfg.dataset, exp_mode=cfg.exp_mode, k=cfg.k,
                  prune_reg=granularity)
    atomic_write(output + ".json", lambda fh: fh.write(json.dumps(report, indent=1, sort_keys=True) + "\n"))
    return report


def summary(report: Dict) -> str:
    if report["kind"] == "sparse":
        return (f"sparse checkpoint {report['file']}: {report['bytes']:,} bytes, {100 * report['bytes_ratio']:.2f}% "
                f"of a dense state dict's {report['dense_bytes']:,}; max abs logit difference "
                f"{report['max_abs_diff']:.2g}")
    kind = "TorchScript" if report["format"] == "torchscript" else "torch.export program"
    text = (f"compact {kind} {report['file']}: {report['macs']:,} -> {report['compact_macs']:,} MACs per "
            f"example ({report['mac_ratio']:.2f}x fewer), {report['params']:,} -> {report['compact_params']:,} "
            f"parameters; max abs logit difference {report['max_abs_diff']:.2g}")
    if "speedup" in report:
        text += (f"; CPU forward at batch {report['speed_batch']} ({report['threads']} threads): "
                 f"{report['speedup']:.2f}x faster")
    return text


def parse(argv: Optional[Sequence[str]]):
    """(export arguments, Config): the export flags here, every other flag resolved as test.py resolves it."""
    parser = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Every other flag names the run as for test.py (--arch, --dataset, "
                                            "--exp-mode, --k, --prune-reg, --stg-id, --result-dir, --source-net, "
                                            "--checkpoint).")
    parser.add_argument("-o", "--output", help="export file (default: <run>/export/<checkpoint>_compact.pt2, "
                        "_compact.pt with --torchscript, or _sparse.pth)")
    parser.add_argument("--torchscript", action="store_true",
                        help="channel pruning: save TorchScript (torch.jit.load; deprecated by torch) instead of a "
                        "torch.export program (torch.export.load)")
    parser.add_argument("--speed-batch", type=int, default=0, metavar="N",
                        help="channel pruning: also time the CPU forward, dense against compact, at batch N")
    args, rest = parser.parse_known_args(argv)
    return args, resolve_config(rest, "test", "export.py", choices=option_choices())[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args, cfg = parse(argv)
        report = export_checkpoint(evaluated_checkpoint(cfg), args.output, args.speed_batch, args.torchscript)
    except UserError as err:
        print(f"export.py: error: {err}", file=sys.stderr)
        return 2
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
