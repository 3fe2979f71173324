"""Plots (PNG) from checkpoints and test.py result JSONs.

    python scripts/plots.py keep-rates  RUN/checkpoint/model_best.pth.tar -o keep.png   # or a result JSON
    python scripts/plots.py accuracy-sparsity trained_models/ -o acc.png [--attack autoattack]
    python scripts/plots.py security-curve RUN/eval/model_best_standard.json ... -o curve.png

keep-rates: per-layer keep rate (%) of one or more pruned models, as bars in layer order on a log axis
    (--linear for a linear one), with each model's global keep rate as a dashed line (the paper's strategy figure). Reads the exact per-layer counts of
    a result JSON or of one of our checkpoints; for a checkpoint of the original code (scores and k_score, no
    stored report) the rates are computed from k_score with --k and --alpha; for a dense state dict the
    non-zero weights are counted.
accuracy-sparsity: natural (solid) and robust (dashed) accuracy against sparsity, one line per table row
    (method, granularity and, for runs with other settings, the settings; replicates as mean with std error bars;
    scripts/results.py), one panel per dataset and architecture; the dense model is a horizontal line.
security-curve: robust accuracy against eps of result JSONs: from FMN's per-point minimal distances (test.py
    --attacks fmn: the exact curve, solid, drawn from the distances file beside the JSON) and from the PGD sweep
    (test.py --epsilons: one PGD run per eps, markers; eps 0 is the natural accuracy). The legend gives each model's
    robust accuracy at its threat model's eps (FMN's where it ran); a dotted vertical line marks that eps.
"""
import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from configs.recipes import DENSE_METHOD  # noqa: E402
from scripts.make_tables import row_label  # noqa: E402
from scripts.results import TableError, load_cells, method_of, sparsity_percent  # noqa: E402

PlotError = TableError


# ----------------------------------------------------------------------------------------------- keep rates
def _load_result(path: str) -> Dict:
    """A test.py result JSON through its reader (trainers/evaluation/report.py), which knows its format."""
    from configs.errors import UserError
    from trainers.evaluation.report import read_result

    try:
        return read_result(path)
    except UserError as err:
        raise PlotError(str(err)) from None


def keep_rates_of(path: str, k: Optional[float] = None, alpha: float = 0.1) -> Tuple[str, Dict[str, Dict]]:
    """(title, {layer: {'keep', 'total'}}) from a result JSON or a checkpoint."""
    if path.endswith(".json"):
        result = _load_result(path)
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
                    k: Optional[float] = None, alpha: float = 0.1, log_scale: bool = True) -> None:
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
    ax.set_xlabel("layer (in the model's order)")
    ax.set_ylabel("weights kept per layer (%)")
    if log_scale:  # keep rates span 0.1 % to 100 %: on a linear axis the small layers vanish
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_plain_number))  # 0.1, 1, 10, not 10^-1
        ax.yaxis.set_minor_formatter(FuncFormatter(_one_two_five))
    sizes = ax.twinx()  # layer sizes give the rates their meaning: big layers are where the weights go
    sizes.plot(range(len(names)), [models[0][1][n]["total"] for n in names], "k.:", linewidth=0.8,
               label="weights in layer")
    sizes.set_yscale("log")
    sizes.set_ylabel("weights in layer", fontsize=8)
    handles, texts = ax.get_legend_handles_labels()
    more, more_texts = sizes.get_legend_handles_labels()
    # outside the axes, to the right: a legend inside would cover bars
    ax.legend(handles + more, texts + more_texts, fontsize=7, loc="upper left", bbox_to_anchor=(1.22, 1.0))
    ax.set_title("per-layer keep rates")
    _save(fig, output)


def _plain_number(value: float, _position=None) -> str:
    return f"{value:g}"


def _one_two_five(value: float, _position=None) -> str:
    """Minor log-axis labels at 2 and 5 times a power of ten only, so a one-decade axis still reads."""
    leading = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
    return f"{value:g}" if round(leading) in (2, 5) and abs(leading - round(leading)) < 1e-6 else ""


# ----------------------------------------------------------------------------------------------- accuracy vs sparsity
def plot_accuracy_sparsity(paths: Sequence[str], output: str, attack: str = "autoattack", preset: str = "standard",
                           metric: str = "auto", dataset: Optional[str] = None) -> None:
    cells = load_cells(paths, attack, preset, metric, dataset)
    panels = sorted({(c.dataset, c.arch) for c in cells})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.0), squeeze=False)
    for ax, (ds, arch) in zip(axes[0], panels):
        mine = [c for c in cells if (c.dataset, c.arch) == (ds, arch) and not c.clash]
        pruned = [c for c in mine if c.method != DENSE_METHOD]
        xs_all = sorted({c.sparsity for c in pruned}) or [0.0]
        colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
        for c in [c for c in mine if c.method == DENSE_METHOD]:
            colour = next(colours)
            name = row_label(c.row)
            ax.axhline(c.natural, color=colour, linestyle="-", linewidth=1, label=f"{name} natural")
            if c.robust is not None:
                ax.axhline(c.robust, color=colour, linestyle="--", linewidth=1, label=f"{name} {attack}")
        for row in sorted({c.row for c in pruned}):
            series = sorted((c for c in pruned if c.row == row), key=lambda c: c.sparsity)
            colour = next(colours)
            name = f"{row_label(row)} ({row[1]})"
            ax.errorbar([c.sparsity for c in series], [c.natural for c in series],
                        yerr=[c.natural_std or 0.0 for c in series], fmt="o-", color=colour, capsize=2,
                        label=f"{name} natural")
            robust = [c for c in series if c.robust is not None]
            if robust:
                ax.errorbar([c.sparsity for c in robust], [c.robust for c in robust],
                            yerr=[c.robust_std or 0.0 for c in robust], fmt="s--", color=colour, capsize=2,
                            label=f"{name} {attack}")
        ax.set_xticks(xs_all)
        ax.set_xlabel("sparsity (% of prunable weights removed)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{ds} {arch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, output)


# ----------------------------------------------------------------------------------------------- security curve
def _curve_hint(result: Dict) -> str:
    """An --epsilons value of the result's own scale (a quarter to twice its threat model's eps)."""
    eps = float(result.get("epsilon") or 8 / 255)
    return ",".join(f"{eps * f:.3g}" for f in (0.25, 0.5, 1.0, 2.0))


FMN_CURVE_POINTS = 1000  # budgets of a curve drawn from distances (the AP benchmark's plots use 1,000 too)


def fmn_curve(path: str, result: Dict) -> Optional[Tuple[List[float], List[float]]]:
    """(eps, robust accuracy %) of the result's FMN distances on FMN_CURVE_POINTS budgets up to its curve's
    largest eps, counted as the run counted them; None without an fmn entry."""
    entry = result.get("attacks", {}).get("fmn")
    if not entry:
        return None
    import torch

    from configs.errors import UserError
    from trainers.evaluation.minimum_norm import counted_distances, read_distances, resolve_distances_file

    try:
        distances = counted_distances(read_distances(resolve_distances_file(path, entry)))
    except UserError as err:
        raise PlotError(str(err)) from None
    grid = torch.linspace(0.0, float(entry["curve"][-1]["eps"]), FMN_CURVE_POINTS, dtype=torch.float64)
    accs = 100.0 * (distances[None, :] > grid[:, None]).double().mean(dim=1)
    return grid.tolist(), accs.tolist()


def plot_security_curves(paths: Sequence[str], output: str, labels: Optional[Sequence[str]] = None) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    results = [_load_result(path) for path in paths]
    defaults = []
    for path, result in zip(paths, results):
        if not result.get("security_curve") and "fmn" not in result.get("attacks", {}):
            raise PlotError(f"{path} has neither FMN distances nor a PGD security_curve; run test.py with "
                            f"--attacks fmn, or with --epsilons, e.g. --epsilons {_curve_hint(result)}")
        method, _ = method_of(result["exp_mode"])
        defaults.append(f"{method} {result['arch']}"
                        + ("" if method == DENSE_METHOD else f" {sparsity_percent(result):g}%"))
    for i, name in enumerate(defaults):  # two models with the same description: tell them apart by run name
        if defaults.count(name) > 1:
            config = results[i].get("train_config") or results[i].get("config") or {}
            defaults[i] = f"{name} ({config.get('exp_name') or os.path.basename(os.path.dirname(paths[i]))})"
    marked = set()
    norms = {r.get("norm", "linf") for r in results}
    kinds = set()
    for i, result in enumerate(results):
        label = labels[i] if labels and i < len(labels) else defaults[i]
        fmn = result.get("attacks", {}).get("fmn")
        eps = fmn["eps"] if fmn else result.get("epsilon")
        colour = None
        if fmn:
            xs, ys = fmn_curve(paths[i], result)
            colour = ax.plot(xs, ys, "-", label=f"{label} (FMN): {fmn['robust_acc']:.2f}% at eps {eps:.4g}")[0].get_color()
            kinds.add("FMN distances")
        if result.get("security_curve"):
            sweep = result["security_curve"]
            points = sorted({(0.0, result["natural_acc"])} | {(p["eps"], p["robust_acc"]) for p in sweep})
            at_eps = [p["robust_acc"] for p in sweep if p["eps"] == result.get("epsilon")]
            text = f"{label} (PGD)" + (f": {at_eps[0]:.2f}% at eps {result['epsilon']:.4g}" if at_eps else "")
            ax.plot([p[0] for p in points], [p[1] for p in points], "o--" if fmn else "o-", color=colour, label=text)
            kinds |= {f"PGD-{p.get('steps')}" for p in sweep}
        if eps and eps not in marked:
            ax.axvline(eps, color="grey", linestyle=":", linewidth=1, label=f"threat model eps = {eps:.4g}")
            marked.add(eps)
    norm = "L∞" if norms == {"linf"} else ("L2" if norms == {"l2"} else "/".join(sorted(norms)))
    ax.set_xlabel(f"perturbation budget eps ({norm} norm, inputs in [0, 1])")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"security curve ({', '.join(sorted(kinds))})")
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
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plots.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    keep = sub.add_parser("keep-rates", allow_abbrev=False, help="per-layer keep rates of pruned models")
    keep.add_argument("inputs", nargs="+", metavar="CHECKPOINT_OR_RESULT_JSON")
    keep.add_argument("--labels", nargs="+", default=None)
    keep.add_argument("--k", type=float, default=None, help="target k of a checkpoint without a stored config")
    keep.add_argument("--alpha", type=float, default=0.1, help="alpha of such a checkpoint (default 0.1)")
    keep.add_argument("--linear", action="store_true", help="linear y axis (default: logarithmic)")
    acc = sub.add_parser("accuracy-sparsity", allow_abbrev=False, help="natural and robust accuracy against sparsity")
    acc.add_argument("inputs", nargs="+", metavar="RESULTS")
    acc.add_argument("--attack", default="autoattack")
    acc.add_argument("--preset", default="standard")
    acc.add_argument("--metric", default="auto", choices=("auto", "acc", "balanced"))
    acc.add_argument("--dataset", default=None)
    curve = sub.add_parser("security-curve", allow_abbrev=False, help="robust accuracy against eps")
    curve.add_argument("inputs", nargs="+", metavar="RESULT_JSON")
    curve.add_argument("--labels", nargs="+", default=None)
    for p in (keep, acc, curve):
        p.add_argument("-o", "--output", required=True, help="PNG file to write")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "keep-rates":
            plot_keep_rates(args.inputs, args.output, args.labels, args.k, args.alpha, not args.linear)
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
