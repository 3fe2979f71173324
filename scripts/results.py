"""Reading a tree of test.py result JSONs into table cells, shared by make_tables.py and plots.py.

A cell is (dataset, method, granularity, architecture, sparsity column). What goes into it, never decided by file
times:

1. One result per run directory and checkpoint: model_best over the last checkpoint over dense exports, then the
   larger n_examples. Copies of the same result (test.py's --results-file) count once; two results of one
   checkpoint that disagree are a clash, shown as such.
2. In a cell, a finetune (the method's result) wins over its prune stage (recipe field `final`).
3. The runs left in a cell are grouped by their settings: the training config stored with the result, the
   evaluation's eps and norm and n_examples — everything except the seed and --exp-name. Runs with equal settings
   are replicates: their mean ± std is shown with n. Runs with other settings get rows of their own, labelled by
   the settings that differ (e.g. `HARP [gamma=0.1]`).
"""
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from configs.errors import UserError
from configs.recipes import DENSE_METHOD, recipe
from configs.schema import OPTION_BY_NAME
from data.info import dataset_info
from pruning.budget import summarize_budgets
from trainers.evaluation.report import read_json, result_of
from utils.run_dir import RUNTIME_OPTIONS

# Config entries that do not change what a result measures: the run's runtime options, where it was written, and
# the seed and --exp-name, which make replicates.
_NOT_SETTINGS = RUNTIME_OPTIONS | {"seed", "exp_name", "result_dir"}


class TableError(Exception):
    """A problem the user can fix (no results, unknown attack): one line, exit code 2."""


@dataclass
class Result:
    path: str
    data: Dict
    method: str
    final: bool
    granularity: str
    sparsity: float            # the column: 100 * (1 - global_keep), rounded to 0.1
    measured_sparsity: float   # unrounded
    natural: float
    robust: Optional[float]
    run: str                   # the run directory the checkpoint belongs to
    rank: Tuple[int, int]      # (checkpoint kind, n_examples): the larger wins within a run
    settings: Tuple            # what makes two runs comparable
    exp_name: str
    seed: Optional[int]
    budget: Optional[Dict] = None   # the model's budget record (pruning.budget.budget_record), None if unpruned

    @property
    def dataset(self) -> str:
        return self.data["dataset"]

    @property
    def arch(self) -> str:
        return self.data["arch"]


@dataclass
class Cell:
    dataset: str
    method: str
    variant: str               # '' or the settings that set this row apart
    granularity: str
    arch: str
    sparsity: float
    natural: float
    robust: Optional[float]
    natural_std: Optional[float] = None
    robust_std: Optional[float] = None
    n: int = 1                 # runs (replicates) averaged
    measured_sparsity: float = 0.0
    paths: List[str] = field(default_factory=list)
    clash: bool = False        # two results of one checkpoint disagree: no number is picked
    off_target: List[Dict] = field(default_factory=list)  # budget records of the runs that missed their target

    @property
    def off_target_note(self) -> str:
        """'' when every run landed within TARGET_TOLERANCE of its target, else what they reached against it."""
        if not self.off_target:
            return ""
        runs = f" in {len(self.off_target)} of {self.n} runs" if self.n > 1 else ""
        return f"off target{runs}: {summarize_budgets(self.off_target)}"

    @property
    def row(self) -> Tuple[str, str, str]:
        return self.method, self.granularity, self.variant


def balanced_metric(metric: str, dataset: str) -> bool:
    """Whether a table shows balanced accuracy: asked for, or (auto) the dataset's description says so (SVHN)."""
    return metric == "balanced" or (metric == "auto" and dataset_info(dataset).balanced_accuracy)


def sparsity_percent(result: Dict) -> float:
    """100 * (1 - global_keep) rounded to one decimal: 98.9996 -> 99.0, 99.9 -> 99.9."""
    return round(100.0 * (1.0 - float(result["sparsity"]["global_keep"])), 1)


def method_of(exp_mode: str) -> Tuple[str, bool]:
    """(method label, whether the stage's model is the method's result) of an exp-mode, from its recipe:
    'harp_finetune' -> ('HARP', True), 'harp_prune' -> ('HARP', False)."""
    spec = recipe(exp_mode)
    return spec.method, spec.final


def find_results(paths: Sequence[str]) -> List[Tuple[str, Dict]]:
    """Every test.py result JSON under the given directories (or the given files), sorted by path; other JSON files
    are skipped, a result of a format this toolkit cannot read is an error (trainers/evaluation/report.py)."""
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
            data = read_json(name)
        except UserError:
            continue  # not JSON at all: not ours
        try:
            result = result_of(data, name)
        except UserError as err:
            raise TableError(str(err)) from None
        if result is not None:
            out.append((name, result))
    return out


def _accuracy(result: Dict, attack: str, balanced: bool) -> Tuple[float, Optional[float]]:
    natural = result.get("natural_balanced_acc") if balanced else None
    natural = result["natural_acc"] if natural is None else natural
    entry = result["attacks"].get(attack)
    if entry is None:
        return natural, None
    robust = entry.get("balanced_acc") if balanced else None
    return natural, entry["robust_acc"] if robust is None else robust


def _run_of(path: str, result: Dict) -> str:
    """The run directory of the evaluated checkpoint (<run>/checkpoint/<file>), else the result's own folder."""
    checkpoint = result.get("checkpoint")
    if isinstance(checkpoint, str) and os.path.basename(os.path.dirname(checkpoint)) == "checkpoint":
        return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    return os.path.dirname(os.path.abspath(path))


def _checkpoint_rank(result: Dict, path: str) -> int:
    stem = os.path.basename(str(result.get("checkpoint") or path))
    return 1 if "_dense" in stem else (3 if stem.startswith("model_best") else 2)


def _settings(result: Dict) -> Tuple:
    config = result.get("train_config") or {}
    items = {k: v for k, v in config.items() if k not in _NOT_SETTINGS and OPTION_BY_NAME.get(k) is not None
             and OPTION_BY_NAME[k].scope != "test"}
    items.update(eval_epsilon=result.get("epsilon"), eval_norm=result.get("norm"),
                 n_examples=result.get("n_examples"))
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in items.items()))


def read_result(path: str, data: Dict, attack: str, balanced: bool) -> Result:
    method, final = method_of(data["exp_mode"])
    dense = method == DENSE_METHOD
    natural, robust = _accuracy(data, attack, balanced)
    config = data.get("train_config") or data.get("config") or {}
    return Result(path, data, method, final, "" if dense else data.get("prune_reg", "weight"),
                  0.0 if dense else sparsity_percent(data), 100.0 * (1.0 - float(data["sparsity"]["global_keep"])),
                  natural, robust, _run_of(path, data), (_checkpoint_rank(data, path), int(data.get("n_examples") or 0)),
                  _settings(data), str(config.get("exp_name") or ""), config.get("seed"), data.get("budget"))


def _one_per_checkpoint(results: Iterable[Result]) -> Tuple[List[Result], Dict[int, List[str]]]:
    """The preferred result of every run (and stage); where those disagree, the clashing files by result id."""
    best: Dict[Tuple, List[Result]] = {}
    for r in results:
        key = (r.run, r.data["exp_mode"], r.settings)
        if key not in best or r.rank > best[key][0].rank:
            best[key] = [r]
        elif r.rank == best[key][0].rank:
            best[key].append(r)
    chosen, clashes = [], {}
    for group in best.values():
        chosen.append(group[0])
        if len({(g.natural, g.robust) for g in group}) > 1:
            clashes[id(group[0])] = [g.path for g in group]
    return chosen, clashes


def _mean_std(values: List[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return statistics.fmean(known), (statistics.stdev(known) if len(known) > 1 else None)


def _shown(value):
    """A setting as a row label shows it: a path (e.g. a strategy file `DIR/strategy.yaml:ID`) by its last part."""
    return os.path.basename(value) if isinstance(value, str) and os.sep in value else value


def _variant_labels(groups: Dict[Tuple, List[Result]]) -> Dict[Tuple, str]:
    """'' for a lone group; else each group's values of the settings in which the groups differ."""
    if len(groups) == 1:
        return {key: "" for key in groups}
    dicts = {key: dict(key) for key in groups}
    differing = sorted({k for d in dicts.values() for k in d if len({json.dumps(x.get(k)) for x in dicts.values()}) > 1})
    labels = {}
    for key, d in dicts.items():
        names = sorted({r.exp_name for r in groups[key] if r.exp_name})
        parts = [f"{k}={_shown(json.loads(d[k])) if k in d else '-'}" for k in differing]
        labels[key] = ", ".join(parts) if parts else "+".join(names)
    return labels


def collect_cells(results: Iterable[Tuple[str, Dict]], attack: str = "autoattack", preset: str = "standard",
                  metric: str = "auto", dataset: Optional[str] = None) -> List[Cell]:
    """One Cell per (dataset, method, variant, granularity, arch, sparsity); see the module docstring."""
    read = []
    for path, data in results:
        if preset != "any" and data.get("preset", "standard") != preset:
            continue
        if dataset and data["dataset"].lower() != dataset.lower():
            continue
        balanced = balanced_metric(metric, data["dataset"])
        read.append(read_result(path, data, attack, balanced))
    chosen, clashes = _one_per_checkpoint(read)
    by_cell: Dict[Tuple, List[Result]] = {}
    for r in chosen:
        by_cell.setdefault((r.dataset, r.method, r.granularity, r.arch, r.sparsity), []).append(r)
    cells = []
    for (ds, method, granularity, arch, sparsity), runs in sorted(by_cell.items()):
        if any(r.final for r in runs):
            runs = [r for r in runs if r.final]
        groups: Dict[Tuple, List[Result]] = {}
        for r in runs:
            groups.setdefault(r.settings, []).append(r)
        labels = _variant_labels(groups)
        for key, group in groups.items():
            natural, natural_std = _mean_std([r.natural for r in group])
            robust, robust_std = _mean_std([r.robust for r in group])
            measured = statistics.fmean(r.measured_sparsity for r in group)
            clashing = [p for r in group for p in clashes.get(id(r), [])]
            missed = [r.budget for r in group if r.budget is not None and not r.budget["on_target"]]
            cells.append(Cell(ds, method, labels[key], granularity, arch, sparsity, natural, robust, natural_std,
                              robust_std, len(group), measured, clashing or [r.path for r in group], bool(clashing),
                              missed))
    return cells


def load_cells(paths: Sequence[str], attack: str = "autoattack", preset: str = "standard", metric: str = "auto",
               dataset: Optional[str] = None) -> List[Cell]:
    """Every cell of the results under `paths` (tables and plots share this); an error if there is none."""
    results = find_results(paths)
    if not results:
        raise TableError(f"no test.py result JSONs under {', '.join(paths)} (run test.py first)")
    cells = collect_cells(results, attack=attack, preset=preset, metric=metric, dataset=dataset)
    if not cells:
        raise TableError(f"{len(results)} result files found, none with preset {preset!r}"
                         + (f" and dataset {dataset}" if dataset else "") + " (try --preset any)")
    if all(c.robust is None for c in cells):
        known = sorted({name for _, r in results for name in r["attacks"]})
        raise TableError(f"no result has attack {attack!r}; the results have: {', '.join(known) or 'none'}")
    return cells
