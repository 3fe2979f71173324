"""Result tables in the paper's layout from a tree of test.py result JSONs.

    python scripts/make_tables.py trained_models/                     # Markdown, AutoAttack (standard preset)
    python scripts/make_tables.py trained_models/ --format csv -o results.csv
    python scripts/make_tables.py trained_models/ --format latex --attack pgd10

One table per dataset. Rows: method x granularity, with the method named by the run's stage recipe
(configs/recipes.py: pretrain -> dense, score_* -> Hydra (score), lwm_finetune -> LWM, rate_* -> rate,
harp_* -> HARP) and the granularity from --prune_reg (weight, channel). Columns: architecture x sparsity, the sparsity being 100 * (1 - global_keep)
of the evaluated model (exact kept counts from the result JSON), rounded to one decimal ("99", "99.9").
Cells: "natural / robust" accuracy in percent with two decimals; "–" where there is no result.

The dense model has no sparsity of its own: its cell is repeated under every sparsity of its architecture.
When several results fall into one cell, the finetune stage wins over the prune stage, then model_best over
the last checkpoint over dense exports, then the larger n_examples, then the newer file.
SVHN cells are balanced accuracy (the paper reports BACC for SVHN) unless --metric acc.
"""
import argparse
import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs.recipes import DENSE_METHOD, METHODS, recipe  # noqa: E402

REQUIRED_KEYS = ("arch", "dataset", "exp_mode", "natural_acc", "attacks", "sparsity")
METHOD_ORDER = METHODS
GRANULARITY_ORDER = ("weight", "channel")
DASH = "–"


class TableError(Exception):
    """A problem the user can fix (no results, unknown attack): one line, exit code 2."""


# ----------------------------------------------------------------------------------------------- loading
def method_of(exp_mode: str) -> Tuple[str, bool]:
    """(method label, whether the stage's model is the method's result) of an exp-mode, from its recipe:
    'harp_finetune' -> ('HARP', True), 'harp_prune' -> ('HARP', False)."""
    spec = recipe(exp_mode)
    return spec.method, spec.final


def sparsity_percent(result: Dict) -> float:
    """100 * (1 - global_keep) rounded to one decimal: 98.9996 -> 99.0, 99.9 -> 99.9."""
    return round(100.0 * (1.0 - float(result["sparsity"]["global_keep"])), 1)


def sparsity_label(percent: float) -> str:
    return f"{percent:g}%"


def find_results(paths: Sequence[str]) -> List[Tuple[str, Dict]]:
    """Every test.py result JSON under the given directories (or the given files), sorted by path."""
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
            continue
        if not os.path.isdir(path):
            raise TableError(f"{path} does not exist")
        for directory, _, names in os.walk(path):
            files.extend(os.path.join(directory, n) for n in names if n.endswith(".json"))
    out = []
    for name in sorted(files):
        try:
            with open(name) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and all(k in data for k in REQUIRED_KEYS):
            out.append((name, data))
    return out


@dataclass
class Entry:
    dataset: str
    method: str
    granularity: str
    arch: str
    sparsity: float
    natural: float
    robust: Optional[float]
    path: str
    preference: Tuple = field(default=())
    measured_sparsity: float = 0.0   # 100 * (1 - global_keep), unrounded


def _accuracy(result: Dict, attack: str, balanced: bool) -> Tuple[float, Optional[float]]:
    natural = result.get("natural_balanced_acc") if balanced else None
    natural = result["natural_acc"] if natural is None else natural
    entry = result["attacks"].get(attack)
    if entry is None:
        return natural, None
    robust = entry.get("balanced_acc") if balanced else None
    return natural, entry["robust_acc"] if robust is None else robust


def _preference(path: str, result: Dict, final: bool) -> Tuple:
    stem = os.path.basename(path)
    checkpoint_rank = 1 if "_dense" in stem else (3 if stem.startswith("model_best") else 2)
    stage_rank = 2 if final else 1
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        mtime = 0.0
    return stage_rank, checkpoint_rank, int(result.get("n_examples") or 0), mtime


def collect(results: Iterable[Tuple[str, Dict]], attack: str = "autoattack", preset: str = "standard",
            metric: str = "auto", dataset: Optional[str] = None) -> List[Entry]:
    """One Entry per table cell: the preferred result of each (dataset, method, granularity, arch, sparsity)."""
    best: Dict[Tuple, Entry] = {}
    for path, result in results:
        if preset != "any" and result.get("preset", "standard") != preset:
            continue
        if dataset and result["dataset"].lower() != dataset.lower():
            continue
        method, final = method_of(result["exp_mode"])
        granularity = "" if method == DENSE_METHOD else result.get("prune_reg", "weight")
        balanced = metric == "balanced" or (metric == "auto" and result["dataset"] == "SVHN")
        natural, robust = _accuracy(result, attack, balanced)
        entry = Entry(result["dataset"], method, granularity, result["arch"],
                      0.0 if method == DENSE_METHOD else sparsity_percent(result), natural, robust, path,
                      _preference(path, result, final), 100.0 * (1.0 - float(result["sparsity"]["global_keep"])))
        key = (entry.dataset, entry.method, entry.granularity, entry.arch, entry.sparsity)
        if key not in best or entry.preference > best[key].preference:
            best[key] = entry
    return list(best.values())


# ----------------------------------------------------------------------------------------------- layout
@dataclass
class Table:
    dataset: str
    columns: List[Tuple[str, float]]                     # (arch, sparsity)
    rows: List[Tuple[str, str]]                          # (method, granularity)
    cells: Dict[Tuple[Tuple[str, str], Tuple[str, float]], str]


def _method_rank(method: str) -> Tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _granularity_rank(granularity: str) -> Tuple[int, str]:
    return (GRANULARITY_ORDER.index(granularity) if granularity in GRANULARITY_ORDER else -1, granularity)


def cell_text(natural: float, robust: Optional[float], sparsity: Optional[float] = None) -> str:
    text = f"{natural:.2f} / {DASH if robust is None else f'{robust:.2f}'}"
    return text if sparsity is None else f"{text} ({sparsity:.2f}% sparse)"


def build_tables(entries: List[Entry], show_sparsity: bool = False) -> List[Table]:
    """show_sparsity: add each model's exact measured sparsity to its cell (columns are rounded to 0.1 %)."""
    tables = []
    for dataset in sorted({e.dataset for e in entries}):
        mine = [e for e in entries if e.dataset == dataset]
        pruned = [e for e in mine if e.method != DENSE_METHOD]
        columns = sorted({(e.arch, e.sparsity) for e in pruned})
        for arch in sorted({e.arch for e in mine if e.method == DENSE_METHOD} - {a for a, _ in columns}):
            columns.append((arch, 0.0))  # only a dense model of this architecture: a 0 % column
        columns.sort()
        rows = sorted({(e.method, e.granularity) for e in mine},
                      key=lambda r: (_method_rank(r[0]), _granularity_rank(r[1])))
        cells = {}
        for e in mine:
            text = cell_text(e.natural, e.robust, e.measured_sparsity if show_sparsity else None)
            if e.method == DENSE_METHOD:
                for arch, sparsity in columns:
                    if arch == e.arch:
                        cells[((e.method, e.granularity), (arch, sparsity))] = text
            else:
                cells[((e.method, e.granularity), (e.arch, e.sparsity))] = text
        tables.append(Table(dataset, columns, rows, cells))
    return tables


def _header(column: Tuple[str, float]) -> str:
    return f"{column[0]} {sparsity_label(column[1])}"


def _row_cells(table: Table, row: Tuple[str, str]) -> List[str]:
    return [table.cells.get((row, col), DASH) for col in table.columns]


def caption(table: Table, attack: str, preset: str, metric: str) -> str:
    balanced = metric == "balanced" or (metric == "auto" and table.dataset == "SVHN")
    what = "balanced accuracy" if balanced else "accuracy"
    return f"{table.dataset}: natural / robust {what} (%), robust = {attack} ({preset} preset)"


def to_markdown(tables: List[Table], attack: str, preset: str, metric: str) -> str:
    blocks = []
    for table in tables:
        lines = [f"**{caption(table, attack, preset, metric)}**", ""]
        lines.append("| method | granularity | " + " | ".join(_header(c) for c in table.columns) + " |")
        lines.append("|---|---|" + "---|" * len(table.columns))
        for row in table.rows:
            lines.append(f"| {row[0]} | {row[1] or DASH} | " + " | ".join(_row_cells(table, row)) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def to_csv(tables: List[Table], attack: str, preset: str, metric: str) -> str:
    columns = []
    for table in tables:
        columns += [c for c in table.columns if c not in columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "method", "granularity"] + [_header(c) for c in columns])
    for table in tables:
        for row in table.rows:
            writer.writerow([table.dataset, row[0], row[1]] +
                            [table.cells.get((row, c), "") for c in columns])
    return buffer.getvalue()


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(a, b)
    return text.replace(DASH, "--")


def to_latex(tables: List[Table], attack: str, preset: str, metric: str) -> str:
    """booktabs tabulars, one per dataset, architectures as grouped column headers."""
    blocks = []
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
            cells = [_latex_escape(c) for c in _row_cells(table, row)]
            lines.append(f"{_latex_escape(row[0])} & {_latex_escape(row[1] or DASH)} & " + " & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


FORMATS = {"md": to_markdown, "markdown": to_markdown, "csv": to_csv, "latex": to_latex, "tex": to_latex}


def load_entries(paths: Sequence[str], attack: str = "autoattack", preset: str = "standard", metric: str = "auto",
                 dataset: Optional[str] = None) -> List["Entry"]:
    """Every usable result under `paths` (tables and plots share this); an error if there is none."""
    results = find_results(paths)
    if not results:
        raise TableError(f"no test.py result JSONs under {', '.join(paths)} (run test.py first)")
    entries = collect(results, attack=attack, preset=preset, metric=metric, dataset=dataset)
    if not entries:
        raise TableError(f"{len(results)} result files found, none with preset {preset!r}"
                         + (f" and dataset {dataset}" if dataset else "") + " (try --preset any)")
    if all(e.robust is None for e in entries):
        known = sorted({name for _, r in results for name in r["attacks"]})
        raise TableError(f"no result has attack {attack!r}; the results have: {', '.join(known) or 'none'}")
    return entries


def make_tables(paths: Sequence[str], fmt: str = "md", attack: str = "autoattack", preset: str = "standard",
                metric: str = "auto", dataset: Optional[str] = None, show_sparsity: bool = False) -> str:
    entries = load_entries(paths, attack, preset, metric, dataset)
    return FORMATS[fmt](build_tables(entries, show_sparsity), attack, preset, metric)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="make_tables.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="RESULTS", help="results tree(s) to walk, or result JSON files")
    parser.add_argument("--format", default="md", choices=sorted(FORMATS), help="output format (default: md)")
    parser.add_argument("--attack", default="autoattack", help="attack in the robust column (default: autoattack)")
    parser.add_argument("--preset", default="standard", help="attack preset of the results to use: standard, "
                        "original or any (default: standard)")
    parser.add_argument("--metric", default="auto", choices=("auto", "acc", "balanced"),
                        help="auto: balanced accuracy for SVHN, accuracy otherwise (default: auto)")
    parser.add_argument("--dataset", default=None, help="only this dataset")
    parser.add_argument("--show-sparsity", action="store_true",
                        help="add each model's exact measured sparsity to its cell")
    parser.add_argument("-o", "--output", default=None, help="write here instead of standard output")
    args = parser.parse_args(argv)
    try:
        text = make_tables(args.paths, args.format, args.attack, args.preset, args.metric, args.dataset,
                           args.show_sparsity)
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
