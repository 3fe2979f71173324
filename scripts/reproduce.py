"""Reproduce a paper's tables with one command: a YAML plan (datasets x architectures x methods x k x granularity x
objectives x seeds) expanded into the stage graph pretrain -> prune -> finetune -> test, run here, printed, or
submitted to SLURM.

    python scripts/reproduce.py scripts/plans/digits.yaml              # run every stage that is not done, here
    python scripts/reproduce.py scripts/plans/harp-cifar10.yaml --dry-run       # each stage: command, dependencies
    python scripts/reproduce.py scripts/plans/harp-cifar10.yaml --slurm --partition gpu --time 24:00:00
    python scripts/reproduce.py scripts/plans/harp-cifar10.yaml --status        # done, running, failed, missing
    python scripts/reproduce.py scripts/plans/harp-cifar10.yaml --collect       # tables and plots of finished cells
    python scripts/reproduce.py scripts/plans/harp-cifar10.yaml --estimate bench-vgg16_bn.json bench-resnet18.json

Stages run from the repository root, one at a time, each as its own train.py / test.py process; a finished stage
is skipped, an interrupted one resumes (train.py), a failed one is listed at the end and its dependents are not
started; the exit status is 0 only when every stage is done. The plan format: scripts/reproduction/plan.py; stage
states and their marker files: scripts/reproduction/state.py; SLURM arrays: scripts/reproduction/slurm.py; the
compute estimate: scripts/reproduction/estimate.py.
"""
import argparse
import json
import os
import shlex
import signal
import sys
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs.errors import UserError  # noqa: E402
from scripts.reproduction.collect import collect, collect_settings, tables_folder  # noqa: E402
from scripts.reproduction.estimate import load_bench, report  # noqa: E402
from scripts.reproduction.local import Interrupted, run_graph  # noqa: E402
from scripts.reproduction.plan import Graph, expand, load_plan  # noqa: E402
from scripts.reproduction.slurm import exec_task, slurm_settings, submit  # noqa: E402
from scripts.reproduction.state import STATES, Markers, cell_state, graph_states, state_root  # noqa: E402

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reproduce.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("plan", nargs="?", help="plan file (YAML), e.g. scripts/plans/digits.yaml")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--dry-run", action="store_true", help="print each stage once: its command and what it needs")
    action.add_argument("--status", action="store_true", help="each cell's state: done, running, failed, missing")
    action.add_argument("--collect", action="store_true", help="tables (md, csv, latex) and the accuracy-sparsity "
                        "plot of the finished cells")
    action.add_argument("--slurm", action="store_true", help="submit one job array per stage, each after the last")
    action.add_argument("--estimate", nargs="*", metavar="BENCH_JSON", help="compute per table from "
                        "scripts/benchmark.py results (one per architecture and input shape); without any: the "
                        "formula and the benchmarks it needs")
    action.add_argument("--exec-task", nargs=2, metavar=("TASKS", "INDEX"), help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help="root of the plan's runs (default: the plan's result_dir)")
    parser.add_argument("--python", default=None, help="interpreter of the stages (default: this one)")
    parser.add_argument("--json", action="store_true", help="--dry-run / --status as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="--status: every stage, not only every cell")
    parser.add_argument("-q", "--quiet", action="store_true", help="run: only one line per stage (the stages' "
                        "output still goes to their logs under <result_dir>/.reproduce/logs/)")
    tables = parser.add_argument_group("--collect")
    tables.add_argument("--out", help="folder for the tables and plot (default: <result_dir>/tables/<plan name>)")
    tables.add_argument("--attack", help="attack of the robust column (default: the plan's, else autoattack)")
    tables.add_argument("--preset", help="attack preset of the results (default: standard)")
    tables.add_argument("--metric", choices=("auto", "acc", "balanced"), help="default: auto (SVHN balanced)")
    cluster = parser.add_argument_group("--slurm (each overrides the plan's slurm: section)")
    cluster.add_argument("--partition")
    cluster.add_argument("--gpus", type=int, help="GPUs per task (train tasks with more run torchrun)")
    cluster.add_argument("--time", help="time limit of every task, e.g. 24:00:00")
    cluster.add_argument("--sbatch-arg", action="append", default=None, metavar="ARG",
                         help="a further sbatch argument, e.g. --sbatch-arg=--account=abc (repeatable)")
    cluster.add_argument("--sbatch", default="sbatch", help="the sbatch command (default: sbatch on PATH)")
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.exec_task is None and args.plan is None:
        parser.error("give a plan file, e.g. scripts/plans/digits.yaml")
    return args


def _at_root(path: Optional[str]) -> Optional[str]:
    """A path given relative to the caller's directory, as the stages (run from the repository root) see it."""
    if path is None:
        return None
    absolute = os.path.abspath(path)
    inside = os.path.commonpath([absolute, ROOT]) == ROOT
    return os.path.relpath(absolute, ROOT) if inside else absolute


def _interpreter(python: Optional[str]) -> str:
    return _at_root(python) if python and os.path.sep in python else (python or _at_root(sys.executable))


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


# ----------------------------------------------------------------------------------------------- actions
def print_dry_run(graph: Graph, python: str, as_json: bool) -> None:
    stages = list(graph.stages.values())
    number = {stage.key: i for i, stage in enumerate(stages, 1)}
    if as_json:
        print(json.dumps([{"id": number[s.key], "key": s.key, "kind": s.kind, "stage": s.stage, "mode": s.mode,
                           "label": s.label, "command": s.command(python), "run_dir": s.run_dir, "result": s.result,
                           "after": [number[d] for d in s.deps]} for s in stages], indent=1))
        return
    trains = sum(1 for s in stages if s.kind == "train")
    print(f"plan {graph.plan.name}: {len(graph.cells)} cells, {len(stages)} stages ({trains} train, "
          f"{len(stages) - trains} test), results under {graph.plan.result_dir}; run from {ROOT}")
    for stage in stages:
        after = ", ".join(f"[{number[d]}]" for d in stage.deps) or "-"
        print(f"[{number[stage.key]}] {stage.label}\n    {shlex.join(stage.command(python))}\n    after: {after}")


def print_status(graph: Graph, markers: Markers, as_json: bool, verbose: bool) -> None:
    states = graph_states(graph, markers)
    cells = [(cell, cell_state(cell.stages, states)) for cell in graph.cells]
    if as_json:
        print(json.dumps({"cells": [{"dataset": c.dataset, "arch": c.arch, "objective": c.objective, "seed": c.seed,
                                     "method": c.method, "granularity": c.granularity, "k": c.k, "state": s,
                                     "stages": {key: states[key].state for key in c.stages}} for c, s in cells],
                          "stages": {key: {"state": st.state, "detail": st.detail} for key, st in states.items()}},
                         indent=1))
        return
    counts = {name: sum(1 for _, s in cells if s == name) for name in STATES}
    stage_counts = {name: sum(1 for st in states.values() if st.state == name) for name in STATES}
    print(f"plan {graph.plan.name}: {len(cells)} cells: " + ", ".join(f"{n} {name}" for name, n in counts.items())
          + f" ({len(states)} stages: " + ", ".join(f"{n} {name}" for name, n in stage_counts.items()) + ")")
    rows = [("state", "dataset", "arch", "objective", "seed", "method", "granularity", "k", "stages done")]
    for cell, state in cells:
        done = sum(1 for key in cell.stages if states[key].state == "done")
        rows.append((state, cell.dataset, cell.arch, cell.objective, _text(cell.seed), cell.method,
                     _text(cell.granularity), _text(cell.k), f"{done}/{len(cell.stages)}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())
    for key, stage in graph.stages.items():
        state = states[key]
        if verbose or state.state in ("failed", "running"):
            print(f"{state.state:8} {stage.label}{': ' + state.detail if state.detail else ''}")
            if state.state == "failed":
                print(f"         log: {markers.log_path(key)}")


def _text(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def run_here(graph: Graph, python: str, markers: Markers, quiet: bool) -> int:
    outcome = run_graph(graph, python, markers, say=lambda line: print(line, flush=True),
                        echo=None if quiet else (lambda line: print("    " + line, flush=True)))
    print(f"{len(outcome.succeeded)} stage(s) ran, {len(outcome.skipped)} were done already, "
          f"{len(outcome.failed)} failed, {len(outcome.blocked)} not started")
    for key, reason in outcome.failed.items():
        print(f"FAILED {graph.stages[key].label}: {reason}")
    for key, reason in outcome.blocked.items():
        print(f"not started: {graph.stages[key].label}: {reason}")
    return 0 if outcome.ok else EXIT_FAILED


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.exec_task:
            tasks, index = args.exec_task
            return exec_task(os.path.abspath(tasks), int(index), say=lambda line: print(line, flush=True))
        plan_path, out = os.path.abspath(args.plan), _at_root(args.out)
        benches = [load_bench(os.path.abspath(path)) for path in args.estimate or []]
        python, result_dir = _interpreter(args.python), _at_root(args.result_dir)
        os.chdir(ROOT)  # the stages' commands and every path in them are relative to the repository root
        from stage import option_choices  # the registries (torch): only once the arguments are fine

        graph = expand(load_plan(plan_path, result_dir), option_choices())
        markers = Markers(state_root(graph.plan.result_dir))
        # every section of the plan is checked whatever is asked for, so a dry run shows what a run would refuse
        slurm = slurm_settings(graph.plan.slurm, {"partition": args.partition, "gpus": args.gpus, "time": args.time,
                                                  "extra": args.sbatch_arg})
        collecting = collect_settings(graph.plan.collect, {"attack": args.attack, "preset": args.preset,
                                                           "metric": args.metric})
        if args.dry_run:
            print_dry_run(graph, python, args.json)
        elif args.status:
            print_status(graph, markers, args.json, args.verbose)
        elif args.collect:
            folder = out or tables_folder(graph, collecting)
            collect(graph, graph_states(graph, markers), folder, collecting)
        elif args.slurm:
            submit(graph, python, markers, slurm, sbatch=args.sbatch)
        elif args.estimate is not None:
            print("\n".join(report(graph, benches)))
        else:
            return run_here(graph, python, markers, args.quiet)
        return 0
    except UserError as err:
        print(f"reproduce.py: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, Interrupted):
        print("reproduce.py: interrupted; rerun the same command to finish what is missing (interrupted runs "
              "resume)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _raise_interrupted)  # scancel, a time limit: stop the stage as Ctrl-C would
    sys.exit(main())
