"""Plots (PNG) from checkpoints and test.py result JSONs.

    python scripts/plots.py keep-rates  RUN/checkpoint/model_best.pth.tar -o keep.png   # or a result JSON
    python scripts/plots.py accuracy-sparsity trained_models/ -o acc.png [--attack autoattack]
    python scripts/plots.py security-curve RUN/eval/model_best_standard.json ... -o curve.png

keep-rates: per-layer keep rate (%) of one or more pruned models, as bars in layer order, with each
    model's global keep rate as a dashed line (the paper's strategy figure). Reads the exact per-layer counts of
    a result JSON or of one of our checkpoints; for a checkpoint of the original code (scores and k_score, no
    stored report) the rates are computed from k_score with --k and --alpha; for a dense state dict the
    non-zero weights are counted.
accuracy-sparsity: natural (solid) and robust (dashed) accuracy against sparsity, one line per method and
    granularity, one panel per dataset and architecture; the dense model is a horizontal line.
security-curve: robust accuracy against eps from the `security_curve` of result JSONs written with
    test.py --epsilons (eps 0 is the natural accuracy); a dotted vertical line marks the evaluated eps.
"""
import argparse
import json
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from configs.recipes import DENSE_METHOD  # noqa: E402
from scripts.make_tables import TableError, load_entries, method_of, sparsity_percent  # noqa: E402

PlotError = TableError


# ----------------------------------------------------------------------------------------------- keep rates
def _load_json(path: str) -> Dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise PlotError(f"cannot read {path}: {err}") from None


def keep_rates_of(path: str, k: Optional[float] = None, alpha: float = 0.1) -> Tuple[str, Dict[str, Dict]]:
    """(title, {layer: {'keep', 'total'}}) from a result JSON or a checkpoint."""
    if path.endswith(".json"):
        result = _load_json(path)
        if "sparsity" not in result:
            raise PlotError(f"{path} is not a test.py result (no 'sparsity')")
        return _title(result), result["sparsity"]["per_layer"]
    from utils.checkpoint import load_checkpoint, state_dict_of
    from configs.errors import UserError

    try:
        ckpt = load_checkpoint(path)
        state = state_dict_of(ckpt, path)
    except UserError as err:
        raise PlotError(str(err)) from None
    report = ckpt.get("sparsity")
    config = ckpt.get("config") or {}
    title = _title(config) if config else os.path.basename(path)
    if isinstance(report, dict) and report.get("per_layer"):
        return title, report["per_layer"]
    return title, _rates_from_state(state, path, k if k is not None else config.get("k"), config.get("alpha", alpha))


def _rates_from_state(state, path, k, alpha) -> Dict[str, Dict]:
    import torch

    from pruning.masks import kept_channel_count, kept_weight_count
    from pruning.rates import keep_from_logit

    layers = {}
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        if leaf != "weight" or value.dim() < 2:
            continue
        n = value.numel()
        scores, logit = state.get(f"{owner}.popup_scores"), state.get(f"{owner}.k_score")
        if scores is None:
            kept = int(torch.count_nonzero(value))
        else:
            if k is None:
                raise PlotError(f"{path} holds pruning scores but no config: pass --k (and --alpha) as in training")
            keep = float(keep_from_logit(logit.float(), alpha * k)) if logit is not None else k
            if scores.shape == value.shape:
                kept = kept_weight_count(keep, n)
            else:
                channels = scores.numel()
                kept = kept_channel_count(keep, channels) * (n // channels)
        layers[owner] = {"kept": kept, "total": n, "keep": kept / n}
    if not layers:
        raise PlotError(f"{path} has no conv or linear weights")
    return layers


def _title(info: Dict) -> str:
    method, _ = method_of(info.get("exp_mode", "pretrain"))
    parts = [info.get("arch", "?"), info.get("dataset", "?"), method]
    if method != DENSE_METHOD:
        parts.append(f"{info.get('prune_reg', 'weight')}, k={info.get('k')}")
    return " ".join(str(p) for p in parts)


def plot_keep_rates(paths: Sequence[str], output: str, labels: Optional[Sequence[str]] = None,
                    k: Optional[float] = None, alpha: float = 0.1, log_scale: bool = False) -> None:
    models = [keep_rates_of(p, k, alpha) for p in paths]
    names = list(models[0][1])
    for path, (_, layers) in zip(paths, models):
        if list(layers) != names:
            raise PlotError(f"{path} has other layers than {paths[0]}; compare models of one architecture")
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.2))
    for i, (title, layers) in enumerate(models):
        label = labels[i] if labels and i < len(labels) else title
        keeps = [100.0 * layers[n]["keep"] for n in names]
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, keeps, width=width, label=label)
        total = sum(layers[n]["total"] for n in names)
        global_keep = 100.0 * sum(layers[n]["keep"] * layers[n]["total"] for n in names) / total
        ax.axhline(global_keep, color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=1,
                   label=f"{label}: global {global_keep:.3g}%")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("weights kept per layer (%)")
    if log_scale:
        ax.set_yscale("log")
    sizes = ax.twinx()  # layer sizes give the rates their meaning: big layers are where the weights go
    sizes.plot(range(len(names)), [models[0][1][n]["total"] for n in names], "k.:", linewidth=0.8,
               label="weights in layer")
    sizes.set_yscale("log")
    sizes.set_ylabel("weights in layer", fontsize=8)
    handles, texts = ax.get_legend_handles_labels()
    more, more_texts = sizes.get_legend_handles_labels()
    ax.legend(handles + more, texts + more_texts, fontsize=7)
    ax.set_title("per-layer keep rates")
    _save(fig, output)


# ----------------------------------------------------------------------------------------------- accuracy vs sparsity
def plot_accuracy_sparsity(paths: Sequence[str], output: str, attack: str = "autoattack", preset: str = "standard",
                           metric: str = "auto", dataset: Optional[str] = None) -> None:
    entries = load_entries(paths, attack, preset, metric, dataset)
    panels = sorted({(e.dataset, e.arch) for e in entries})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.0), squeeze=False)
    for ax, (ds, arch) in zip(axes[0], panels):
        mine = [e for e in entries if (e.dataset, e.arch) == (ds, arch)]
        pruned = [e for e in mine if e.method != DENSE_METHOD]
        xs_all = sorted({e.sparsity for e in pruned}) or [0.0]
        colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
        for e in [e for e in mine if e.method == DENSE_METHOD]:
            colour = next(colours)
            ax.axhline(e.natural, color=colour, linestyle="-", linewidth=1, label="dense natural")
            if e.robust is not None:
                ax.axhline(e.robust, color=colour, linestyle="--", linewidth=1, label=f"dense {attack}")
        for method, granularity in sorted({(e.method, e.granularity) for e in pruned}):
            series = sorted((e for e in pruned if (e.method, e.granularity) == (method, granularity)),
                            key=lambda e: e.sparsity)
            colour = next(colours)
            name = f"{method} ({granularity})"
            ax.plot([e.sparsity for e in series], [e.natural for e in series], "o-", color=colour,
                    label=f"{name} natural")
            robust = [(e.sparsity, e.robust) for e in series if e.robust is not None]
            if robust:
                ax.plot(*zip(*robust), "s--", color=colour, label=f"{name} {attack}")
        ax.set_xticks(xs_all)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{ds} {arch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, output)


# ----------------------------------------------------------------------------------------------- security curve
def plot_security_curves(paths: Sequence[str], output: str, labels: Optional[Sequence[str]] = None) -> None:
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    marked = set()
    for i, path in enumerate(paths):
        result = _load_json(path)
        curve = result.get("security_curve")
        if not curve:
            raise PlotError(f"{path} has no security_curve; run test.py with --epsilons, e.g. --epsilons 0.01,0.02,0.031")
        points = sorted({(0.0, result["natural_acc"])} | {(p["eps"], p["robust_acc"]) for p in curve})
        method, _ = method_of(result["exp_mode"])
        default = f"{method} {result['arch']}" + ("" if method == DENSE_METHOD else f" {sparsity_percent(result):g}%")
        label = labels[i] if labels and i < len(labels) else default
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
        eps = result.get("epsilon")
        if eps and eps not in marked:
            ax.axvline(eps, color="grey", linestyle=":", linewidth=1)
            marked.add(eps)
    steps = {p.get("steps") for path in paths for p in (_load_json(path).get("security_curve") or [])}
    ax.set_xlabel("eps")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("security curve" + (f" (PGD-{steps.pop()})" if len(steps) == 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, output)


def _save(fig, output: str) -> None:
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    fig.tight_layout()
    fig.savefig(output, dpi=150)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="plots.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    keep = sub.add_parser("keep-rates", help="per-layer keep rates of pruned models")
    keep.add_argument("inputs", nargs="+", metavar="CHECKPOINT_OR_RESULT_JSON")
    keep.add_argument("--labels", nargs="+", default=None)
    keep.add_argument("--k", type=float, default=None, help="target k of a checkpoint without a stored config")
    keep.add_argument("--alpha", type=float, default=0.1, help="alpha of such a checkpoint (default 0.1)")
    keep.add_argument("--log", action="store_true", help="logarithmic y axis")
    acc = sub.add_parser("accuracy-sparsity", help="natural and robust accuracy against sparsity")
    acc.add_argument("inputs", nargs="+", metavar="RESULTS")
    acc.add_argument("--attack", default="autoattack")
    acc.add_argument("--preset", default="standard")
    acc.add_argument("--metric", default="auto", choices=("auto", "acc", "balanced"))
    acc.add_argument("--dataset", default=None)
    curve = sub.add_parser("security-curve", help="robust accuracy against eps")
    curve.add_argument("inputs", nargs="+", metavar="RESULT_JSON")
    curve.add_argument("--labels", nargs="+", default=None)
    for p in (keep, acc, curve):
        p.add_argument("-o", "--output", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "keep-rates":
            plot_keep_rates(args.inputs, args.output, args.labels, args.k, args.alpha, args.log)
        elif args.command == "accuracy-sparsity":
            plot_accuracy_sparsity(args.inputs, args.output, args.attack, args.preset, args.metric, args.dataset)
        else:
            plot_security_curves(args.inputs, args.output, args.labels)
    except PlotError as err:
        print(f"plots.py: error: {err}", file=sys.stderr)
        return 2
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
