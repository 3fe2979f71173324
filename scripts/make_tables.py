"""Result tables in the paper's layout from a tree of test.py result JSONs.

    python scripts/make_tables.py trained_models/                     # Markdown, AutoAttack (standard preset)
    python scripts/make_tables.py trained_models/ --format csv -o results.csv
    python scripts/make_tables.py trained_models/ --format latex --attack pgd10
    python scripts/make_tables.py trained_models/ --attack fmn --value median_distance   # FMN's median distance

One table per dataset. Rows: method x granularity, the method named by the run's stage recipe
(configs/recipes.py: pretrain -> dense, score_* -> Hydra (score), lwm_finetune -> LWM, rate_* -> rate,
harp_* -> HARP), the granularity from --prune_reg (weight, channel), and a row of its own for runs with other
settings (labelled by the settings that differ). Columns: architecture x sparsity, the sparsity being
100 * (1 - global_keep) of the evaluated model (exact kept counts from the result JSON), rounded to one decimal
("99", "99.9"). Cells: "natural / robust" accuracy in percent with two decimals; "–" where there is no result;
a model that ended more than 10 % (relative) away from its --k target (the result's `budget` record) is marked
"[off target: kept 0.253 % vs 1 %]" (FLOPs for channel pruning; the CSV counts such runs in `off_target_runs`);
replicates (runs that differ only in --seed or --exp-name) as mean ± std with their number n. How results are
chosen and grouped: scripts/results.py. The dense model has no sparsity of its own: its cell is repeated under
every sparsity of its architecture. SVHN cells are balanced accuracy (the paper reports BACC for SVHN) unless
--metric acc.

--value median_distance puts the attack's median minimal distance (test.py --attacks fmn) in the robust column
instead of its robust accuracy, with four significant digits.

--format csv writes one line per cell with numeric columns (natural, natural_std, robust, robust_std, n,
sparsity); --format latex needs \\usepackage{booktabs}.
"""
import argparse
import csv
import io
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs.recipes import DENSE_METHOD, METHODS  # noqa: E402
from scripts.results import Cell, TableError, balanced_metric, collect_cells, find_results, load_cells  # noqa: E402

METHOD_ORDER = METHODS
GRANULARITY_ORDER = ("weight", "channel")
DASH = "–"
VALUES = ("robust_acc", "median_distance")  # what the robust column shows (an attack entry's key)
Row = Tuple[str, str, str]  # (method, granularity, variant)


def sparsity_label(percent: float) -> str:
    return f"{percent:g}%"


# ----------------------------------------------------------------------------------------------- layout
@dataclass
class Table:
    dataset: str
    columns: List[Tuple[str, float]]                     # (arch, sparsity)
    rows: List[Row]
    cells: Dict[Tuple[Row, Tuple[str, float]], Cell]
    value: str = "robust_acc"                            # VALUES


def _row_rank(row: Row) -> Tuple:
    method, granularity, variant = row
    return ((METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method),
            (GRANULARITY_ORDER.index(granularity) if granularity in GRANULARITY_ORDER else -1, granularity), variant)


def _number(value: Optional[float], std: Optional[float], spec: str = ".2f") -> str:
    if value is None:
        return DASH
    return f"{value:{spec}}" if std is None else f"{value:{spec}} ± {std:{spec}}"


def cell_text(cell: Cell, show_sparsity: bool = False, value: str = "robust_acc") -> str:
    if cell.clash:
        return f"clash: {len(cell.paths)} results disagree"
    spec = ".2f" if value == "robust_acc" else ".4g"  # distances are small numbers: significant digits
    text = f"{_number(cell.natural, cell.natural_std)} / {_number(cell.robust, cell.robust_std, spec)}"
    if cell.n > 1:
        text += f" (n={cell.n})"
    if cell.off_target:  # never a model far from its --k in that k's column without saying so
        text += f" [{cell.off_target_note}]"
    return text if not show_sparsity else f"{text} ({cell.measured_sparsity:.2f}% sparse)"


def build_tables(cells: List[Cell], value: str = "robust_acc") -> List[Table]:
    tables = []
    for dataset in sorted({c.dataset for c in cells}):
        mine = [c for c in cells if c.dataset == dataset]
        pruned = [c for c in mine if c.method != DENSE_METHOD]
        columns = sorted({(c.arch, c.sparsity) for c in pruned})
        for arch in sorted({c.arch for c in mine if c.method == DENSE_METHOD} - {a for a, _ in columns}):
            columns.append((arch, 0.0))  # only a dense model of this architecture: a 0 % column
        columns.sort()
        rows = sorted({c.row for c in mine}, key=_row_rank)
        placed = {}
        for c in mine:
            targets = [col for col in columns if col[0] == c.arch] if c.method == DENSE_METHOD else [(c.arch, c.sparsity)]
            for col in targets:
                placed[(c.row, col)] = c
        tables.append(Table(dataset, columns, rows, placed, value))
    return tables


def row_label(row: Row) -> str:
    method, _, variant = row
    return f"{method} [{variant}]" if variant else method


def _header(column: Tuple[str, float]) -> str:
    return f"{column[0]} {sparsity_label(column[1])}"


def _row_cells(table: Table, row: Row, show_sparsity: bool) -> List[str]:
    return [cell_text(table.cells[(row, col)], show_sparsity, table.value) if (row, col) in table.cells else DASH
            for col in table.columns]


def caption(table: Table, attack: str, preset: str, metric: str) -> str:
    balanced = balanced_metric(metric, table.dataset)
    what = "balanced accuracy" if balanced else "accuracy"
    if table.value == "median_distance":
        return (f"{table.dataset}: natural {what} (%) / median minimal distance of {attack} (clean-correct points; "
                f"{preset} preset)")
    return f"{table.dataset}: natural / robust {what} (%), robust = {attack} ({preset} preset)"


def to_markdown(tables: List[Table], attack: str, preset: str, metric: str, show_sparsity: bool = False) -> str:
    blocks = []
    for table in tables:
        lines = [f"**{caption(table, attack, preset, metric)}**", ""]
        lines.append("| method | granularity | " + " | ".join(_header(c) for c in table.columns) + " |")
        lines.append("|---|---|" + "---|" * len(table.columns))
        for row in table.rows:
            lines.append(f"| {row_label(row)} | {row[1] or DASH} | " + " | ".join(_row_cells(table, row, show_sparsity))
                         + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


CSV_COLUMNS = ("dataset", "method", "variant", "granularity", "arch", "sparsity", "natural", "natural_std", "robust",
               "robust_std", "n", "measured_sparsity", "attack", "clash", "off_target_runs")


def to_csv(tables: List[Table], attack: str, preset: str, metric: str, show_sparsity: bool = False) -> str:
    """One line per cell, numbers as numbers (empty where unknown); the dense model once per architecture."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    seen = set()
    for table in tables:
        for (row, _), cell in table.cells.items():
            if id(cell) in seen:
                continue
            seen.add(id(cell))
            numbers = [cell.sparsity, cell.natural, cell.natural_std, cell.robust, cell.robust_std, cell.n,
                       round(cell.measured_sparsity, 6)]
            writer.writerow([table.dataset, cell.method, cell.variant, cell.granularity, cell.arch]
                            + ["" if v is None else v for v in numbers]
                            + [attack if table.value == "robust_acc" else f"{attack} {table.value}", int(cell.clash),
                               len(cell.off_target)])
    return buffer.getvalue()


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(a, b)
    return text.replace(DASH, "--").replace("±", r"$\pm$")


def to_latex(tables: List[Table], attack: str, preset: str, metric: str, show_sparsity: bool = False) -> str:
    """booktabs tabulars (\\usepackage{booktabs}), one per dataset, architectures as grouped column headers."""
    blocks = ["% needs \\usepackage{booktabs} (\\toprule, \\midrule, \\cmidrule, \\bottomrule)"]
    for table in tables:
        archs = []
        for arch, _ in table.columns:
            if arch not in archs:
                archs.append(arch)
        spans = [(arch, sum(1 for a, _ in table.columns if a == arch)) for arch in archs]
        lines = [f"% {caption(table, attack, preset, metric)}",
                 r"\begin{tabular}{ll" + "c" * len(table.columns) + "}", r"\toprule"]
        lines.append("method & granularity & " + " & ".join(
            rf"\multicolumn{{{n}}}{{c}}{{{_latex_escape(arch)}}}" for arch, n in spans) + r" \\")
        start = 3
        rules = []
        for _, n in spans:
            rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
            start += n
        lines.append(" ".join(rules))
        lines.append(" & & " + " & ".join(_latex_escape(sparsity_label(s)) for _, s in table.columns) + r" \\")
        lines.append(r"\midrule")
        for row in table.rows:
            cells = [_latex_escape(c) for c in _row_cells(table, row, show_sparsity)]
            lines.append(f"{_latex_escape(row_label(row))} & {_latex_escape(row[1] or DASH)} & " + " & ".join(cells)
                         + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


FORMATS = {"md": to_markdown, "markdown": to_markdown, "csv": to_csv, "latex": to_latex, "tex": to_latex}


def _value_cells(paths: Sequence[str], attack: str, value: str, preset: str, metric: str,
                 dataset: Optional[str]) -> List[Cell]:
    """The cells with the attack entries' `value` in the robust column (scripts/results.py reads robust_acc)."""
    results = find_results(paths)
    has_value = [(path, data) for path, data in results if value in (data["attacks"].get(attack) or {})]
    if not has_value:
        raise TableError(f"no result under {', '.join(paths)} has {attack!r} with a {value}"
                         + (" (run test.py --attacks fmn)" if value == "median_distance" else ""))
    moved = []
    for path, data in results:
        attacks = {name: e for name, e in data["attacks"].items() if name != attack}
        entry = data["attacks"].get(attack)
        if entry is not None and value in entry:
            attacks[attack] = {"robust_acc": entry[value]}
        moved.append((path, dict(data, attacks=attacks)))
    return collect_cells(moved, attack=attack, preset=preset, metric=metric, dataset=dataset)


def make_tables(paths: Sequence[str], fmt: str = "md", attack: str = "autoattack", preset: str = "standard",
                metric: str = "auto", dataset: Optional[str] = None, show_sparsity: bool = False,
                value: str = "robust_acc") -> str:
    if value not in VALUES:
        raise TableError(f"--value {value!r} is not one of {', '.join(VALUES)}")
    cells = (load_cells(paths, attack, preset, metric, dataset) if value == "robust_acc"
             else _value_cells(paths, attack, value, preset, metric, dataset))
    for cell in cells:
        if cell.clash:
            print(f"make_tables.py: warning: results of one checkpoint disagree ({', '.join(cell.paths)}); "
                  "the cell says so", file=sys.stderr)
    return FORMATS[fmt](build_tables(cells, value), attack, preset, metric, show_sparsity)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_tables.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("paths", nargs="+", metavar="RESULTS", help="results tree(s) to walk, or result JSON files")
    parser.add_argument("--format", default="md", choices=sorted(FORMATS), help="output format (default: md)")
    parser.add_argument("--attack", default="autoattack", help="attack in the robust column (default: autoattack)")
    parser.add_argument("--preset", default="standard", help="attack preset of the results to use: standard, "
                        "original, ap or any (default: standard)")
    parser.add_argument("--metric", default="auto", choices=("auto", "acc", "balanced"),
                        help="auto: balanced accuracy for SVHN, accuracy otherwise (default: auto)")
    parser.add_argument("--dataset", default=None, help="only this dataset")
    parser.add_argument("--value", default="robust_acc", choices=VALUES,
                        help="what the robust column shows: the attack's robust accuracy, or (fmn) its median "
                        "minimal distance (default: robust_acc)")
    parser.add_argument("--show-sparsity", action="store_true",
                        help="add each model's exact measured sparsity to its cell")
    parser.add_argument("-o", "--output", default=None, help="write here instead of standard output")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        text = make_tables(args.paths, args.format, args.attack, args.preset, args.metric, args.dataset,
                           args.show_sparsity, args.value)
    except TableError as err:
        print(f"make_tables.py: error: {err}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
