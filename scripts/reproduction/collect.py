"""Tables and plots of a plan's finished cells, through scripts/make_tables.py and scripts/plots.py.

Only the result files of cells whose test is done are read, so results of other experiments in the same tree stay
out. Replicates (the plan's seeds, each in its own subtree) become mean ± std with their n, as make_tables groups
runs that differ only in seed, --exp-name or result directory.

The plan's `collect:` section (flags override it): attack (default autoattack), preset (standard), metric (auto:
balanced accuracy for SVHN; the AP benchmark reports plain accuracy: acc), show_sparsity (false); and for
compare.md (scripts/reproduction/compare.py: the methods by the plan's own (granularity, k) cells over the seeds,
paired against one method) reference (HARP) and compare_attacks (default: attack; `measured`: every attack each
objective's results hold).
"""
import os
from typing import Any, Callable, Dict, List, Mapping

from configs.errors import UserError
from scripts.reproduction.compare import DEFAULT_REFERENCE, compare
from scripts.reproduction.plan import Graph
from scripts.reproduction.state import DONE, StageState

SETTINGS = {"attack": "autoattack", "preset": "standard", "metric": "auto", "show_sparsity": False,
            "reference": DEFAULT_REFERENCE, "compare_attacks": None}
COMPARE_FILE = "compare.md"
TABLE_FORMATS = {"md": "table.md", "csv": "table.csv", "latex": "table.tex"}
PLOT_FILE = "accuracy_sparsity.png"


def collect_settings(plan_section: Mapping[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(plan_section) - set(SETTINGS))
    if unknown:
        raise UserError(f"unknown collect setting {unknown[0]!r} in the plan; allowed: {', '.join(SETTINGS)}")
    merged = {**SETTINGS, **plan_section}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return merged


def tables_folder(graph: Graph, settings: Mapping[str, Any]) -> str:
    """<result_dir>/tables/<plan name>/, and a subfolder per other attack (--collect --attack certify) so that a
    collection by another measure never overwrites the plan's own."""
    folder = os.path.join(graph.plan.result_dir, "tables", graph.plan.name)
    own = collect_settings(graph.plan.collect, {})["attack"]
    return folder if settings["attack"] == own else os.path.join(folder, settings["attack"])


def finished_results(graph: Graph, states: Mapping[str, StageState]) -> List[str]:
    """Result files of the cells whose test is done, in plan order."""
    return list(dict.fromkeys(graph.stages[c.test].result for c in graph.cells if states[c.test].state == DONE))


def collect(graph: Graph, states: Mapping[str, StageState], out_dir: str, settings: Mapping[str, Any],
            say: Callable[[str], None] = print) -> List[str]:
    """Write table.md, table.csv, table.tex, accuracy_sparsity.png and compare.md of the finished cells into
    out_dir; returns the files written."""
    from scripts.make_tables import make_tables  # noqa: E402 (matplotlib and the tables only when collecting)
    from scripts.plots import plot_accuracy_sparsity
    from scripts.results import TableError

    results = finished_results(graph, states)
    if not results:
        raise UserError(f"no cell of plan {graph.plan.name} is finished yet (see --status)")
    os.makedirs(out_dir, exist_ok=True)
    common = dict(attack=settings["attack"], preset=settings["preset"], metric=settings["metric"])
    written = []
    try:
        for fmt, name in TABLE_FORMATS.items():
            text = make_tables(results, fmt, show_sparsity=bool(settings["show_sparsity"]), **common)
            path = os.path.join(out_dir, name)
            with open(path, "w") as fh:
                fh.write(text)
            written.append(path)
        plot_accuracy_sparsity(results, os.path.join(out_dir, PLOT_FILE), **common)
        written.append(os.path.join(out_dir, PLOT_FILE))
        attacks = settings["compare_attacks"] or [settings["attack"]]
        path = os.path.join(out_dir, COMPARE_FILE)
        with open(path, "w") as fh:
            fh.write(compare(graph, states, [attacks] if isinstance(attacks, str) else list(attacks),
                             reference=str(settings["reference"])))
        written.append(path)
    except TableError as err:
        raise UserError(str(err)) from None
    say(f"{len(results)} of {len(graph.cells)} cells finished; wrote {', '.join(written)}")
    return written
