"""A plan's methods side by side at each (granularity, k), over its seeds, and paired against one reference method.

    python scripts/reproduce.py scripts/plans/study-digits.yaml --collect      # also writes compare.md

The columns are the plan's own (granularity, k) cells, not the measured sparsity: at channel granularity `k` sets a
FLOPs target, so methods compared at equal FLOPs keep different fractions of their weights (each cell shows what
its models kept: the measured weight sparsity and, from the result's `budget`, the reached keep fraction or FLOPs
ratio against the target; a model off target is marked). A cell is mean ± std over the seeds (n).

The paired comparison pairs the reference method's model with the other method's model of the same seed, dataset,
architecture, objective, granularity and k (they share the seed's pretrained network): per accuracy the mean
difference reference - other, its standard deviation, how many seeds the reference wins, and the two-sided paired
t-test's p-value (scipy.stats.ttest_rel; with 3 seeds it needs a consistent gap to fall under 0.05).

The accuracies shown are natural plus the attacks asked for, or with `measured` every attack each section's results
hold (a plan whose objectives are tested with different measures, e.g. scripts/plans/hydra-mnist.yaml). A certify
result also offers its certified accuracy at each radius of its grid as `certify r=<radius>` (its `certify` is
radius 0).
"""
import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from scripts.reproduction.plan import Cell, Graph
from scripts.reproduction.state import DONE, StageState
from trainers.evaluation.report import read_result

DEFAULT_REFERENCE = "HARP"
NATURAL = "natural"
MEASURED = "measured"   # compare_attacks: every attack the section's results hold


@dataclass(frozen=True)
class Measured:
    """What one cell's test measured."""
    accuracies: Mapping[str, float]     # 'natural' and every attack's robust accuracy, in percent
    sparsity: float                     # measured weight sparsity, percent
    budget: Optional[Mapping]           # the model's budget record (pruning.budget.budget_record), if any


def _read(path: str) -> Measured:
    result = read_result(path)  # the result schema's reader: refuses a format this toolkit cannot read
    accuracies = {NATURAL: float(result["natural_acc"])}
    for name, entry in result["attacks"].items():
        if name != NATURAL and entry.get("robust_acc") is not None:
            accuracies[name] = float(entry["robust_acc"])
        accuracies.update({f"{name} r={point['radius']:g}": float(point["acc"])
                           for point in entry.get("certified_accuracy", []) if point["radius"] > 0})
    return Measured(accuracies, 100.0 * (1.0 - float(result["sparsity"]["global_keep"])), result.get("budget"))


def _column(cell: Cell) -> Tuple[str, float]:
    return (cell.granularity or "", cell.k or 0.0)


def _group(cell: Cell) -> Tuple:
    return cell.dataset, cell.arch, cell.objective


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def _column_label(column: Tuple[str, float]) -> str:
    granularity, k = column
    if not granularity:
        return "dense"
    if granularity == "weight":
        return f"weight k {k:g} ({100 * (1 - k):.4g} % pruned)"
    return f"channel k {k:g}"


def _budget_text(measured: List[Measured]) -> str:
    """'99.00 % sparse' and, with a budget, 'FLOPs 6.27 % (target 6.27 %)'; marked when a model is off target."""
    text = f"{statistics.fmean(m.sparsity for m in measured):.2f} % sparse"
    budgets = [m.budget for m in measured if m.budget]
    if budgets and budgets[0]["measure"] == "flops":
        reached = statistics.fmean(b["reached"] for b in budgets)
        text += f", FLOPs {100 * reached:.3g} % (target {100 * budgets[0]['target']:.3g} %)"
    off = sum(1 for b in budgets if not b["on_target"])
    return text + (f", **{off} off target**" if off else "")


def _p_value(differences: Sequence[float]) -> Optional[float]:
    if len(differences) < 2:
        return None
    if statistics.pstdev(differences) == 0:
        return 0.0 if differences[0] != 0 else 1.0
    from scipy.stats import ttest_1samp  # the paired t-test on the differences (scipy only when comparing)
    return float(ttest_1samp(differences, 0.0).pvalue)


def compare(graph: Graph, states: Mapping[str, StageState], attacks: Sequence[str],
            reference: str = DEFAULT_REFERENCE) -> str:
    """The markdown of the comparison of every finished cell (see the module docstring)."""
    measured: Dict[Tuple, Dict[Tuple, Dict[str, List[Tuple[Optional[int], Measured]]]]] = {}
    for cell in graph.cells:
        if states[cell.test].state != DONE:
            continue
        result = graph.stages[cell.test].result
        by_column = measured.setdefault(_group(cell), {}).setdefault(_column(cell), {})
        by_column.setdefault(cell.method, []).append((cell.seed, _read(result)))
    lines: List[str] = []
    for (dataset, arch, objective), columns in measured.items():
        shown = [NATURAL] + [a for a in (_measured_attacks(columns) if list(attacks) == [MEASURED] else attacks)
                             if a != NATURAL]
        lines += [f"## {dataset}, {arch}, {objective}", ""]
        lines += _means_table(columns, shown)
        lines += _paired_table(columns, shown, reference)
    return "\n".join(lines) + "\n"


def _measured_attacks(columns: Mapping[Tuple, Mapping[str, List]]) -> List[str]:
    """Every accuracy the section's results hold, in the order the results list them."""
    names = (name for by_method in columns.values() for runs in by_method.values() for _, m in runs
             for name in m.accuracies)
    return list(dict.fromkeys(names))


def _means_table(columns: Mapping[Tuple, Mapping[str, List]], shown: Sequence[str]) -> List[str]:
    lines = [f"Mean ± std over the seeds (n), accuracy % ({' / '.join(shown)}):", "",
             "| column | method | n | " + " | ".join(shown) + " | models |",
             "|---" * (len(shown) + 4) + "|"]
    for column in sorted(columns):
        for method, runs in columns[column].items():
            values = [_mean_std([m.accuracies[a] for _, m in runs if a in m.accuracies]) for a in shown]
            lines.append(f"| {_column_label(column)} | {method} | {len(runs)} | " + " | ".join(values)
                         + f" | {_budget_text([m for _, m in runs])} |")
    return lines + [""]


def _paired_table(columns: Mapping[Tuple, Mapping[str, List]], shown: Sequence[str], reference: str) -> List[str]:
    lines = [f"Paired by seed, {reference} − method (accuracy points): mean ± std, seeds {reference} wins of n, "
             "two-sided paired t-test p:", "",
             "| column | method | " + " | ".join(shown) + " |", "|---" * (len(shown) + 2) + "|"]
    rows = 0
    for column in sorted(columns):
        ours = dict(columns[column].get(reference, []))
        for method, runs in columns[column].items():
            if method == reference:
                continue
            pairs = [(ours[seed], m) for seed, m in runs if seed in ours]
            if not pairs:
                continue
            texts = []
            for attack in shown:
                differences = [a.accuracies[attack] - b.accuracies[attack] for a, b in pairs
                               if attack in a.accuracies and attack in b.accuracies]
                texts.append(_difference_text(differences))
            lines.append(f"| {_column_label(column)} | {method} | " + " | ".join(texts) + " |")
            rows += 1
    return lines + [""] if rows else []


def _difference_text(differences: Sequence[float]) -> str:
    if not differences:
        return "–"
    wins = sum(1 for d in differences if d > 0)
    p = _p_value(differences)
    text = f"{_mean_std(differences)} ({wins}/{len(differences)}"
    return text + (f", p {p:.2g})" if p is not None and not math.isnan(p) else ")")
