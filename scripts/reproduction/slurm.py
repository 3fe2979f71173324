"""Submitting a plan to SLURM: one job array per stage (pretrain, prune, finetune, test), each starting after the
previous array succeeded (`--dependency=afterok:<job>`), with `--kill-on-invalid-dep=yes` so that a failed array
cancels the later ones instead of leaving them pending forever.

Only stages that are not done are submitted. Each array reads its tasks from a JSON-lines file under
<result_dir>/.reproduce/slurm/ (one stage per line: its command and where its markers go); its job script runs
`python scripts/reproduce.py --exec-task FILE $SLURM_ARRAY_TASK_ID`, which writes the same markers as a local run, so
`--status` sees running and failed tasks. A train task with more than one GPU runs under
`torch.distributed.run --standalone` (one node). Rerunning `--slurm` after a failure submits what is still missing;
a train stage cut off by the time limit resumes from its last checkpoint.

Settings, from the plan's `slurm:` section, overridden by flags; each value may be one value or a mapping per stage
(`time: {pretrain: "24:00:00", prune: "6:00:00", default: "12:00:00"}`):
  partition, gpus (per task; 0 for none), cpus_per_task, mem, time, max_parallel (array throttle `%N`),
  extra (a list of further sbatch arguments, e.g. ["--account=abc", "--qos=high"]).
"""
import datetime
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from configs.errors import UserError
from configs.recipes import STAGES
from scripts.reproduction.local import ROOT, run_command
from scripts.reproduction.plan import TEST, TRAIN, Graph, Stage
from scripts.reproduction.state import Markers, test_done

ARRAY_ORDER = STAGES + (TEST,)
SETTINGS = ("partition", "gpus", "cpus_per_task", "mem", "time", "max_parallel", "extra")
SETTING_MINIMUM = {"gpus": 0, "cpus_per_task": 1, "max_parallel": 1}  # the integer settings


@dataclass(frozen=True)
class Submission:
    stage: str          # pretrain, prune, finetune or test
    job_id: str
    tasks: List[str]    # stage keys, task i = line i of the tasks file
    tasks_file: str
    sbatch_args: List[str]


def slurm_settings(plan_section: Mapping[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """The plan's `slurm:` settings with the command line's on top (None: not given), each of its type."""
    unknown = sorted(set(plan_section) - set(SETTINGS))
    if unknown:
        raise UserError(f"unknown slurm setting {unknown[0]!r} in the plan; allowed: {', '.join(SETTINGS)}")
    merged = dict(plan_section)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    for name, value in merged.items():
        for stage, single in (value.items() if isinstance(value, Mapping) else [(None, value)]):
            if stage is not None and stage not in ARRAY_ORDER + ("default",):
                raise UserError(f"slurm {name}: unknown stage {stage!r}; use {', '.join(ARRAY_ORDER)} or default")
            _check_setting(name if stage is None else f"{name}.{stage}", single, SETTING_MINIMUM.get(name))
    return merged


def _check_setting(where: str, value: Any, minimum: Optional[int]) -> None:
    """An integer >= minimum (gpus, cpus_per_task, max_parallel), a list of sbatch arguments or one string (extra),
    else text or a number (partition, mem, time: '12:00:00' or minutes)."""
    if value is None:
        return
    if minimum is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"slurm {where} must be an integer >= {minimum}, got {value!r}")
    elif where.startswith("extra"):
        if not isinstance(value, (str, list)) or not all(isinstance(a, str) for a in value):
            raise UserError(f"slurm {where} must be a list of sbatch arguments, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"slurm {where} must be text or a whole number, got {value!r}")


def _for_stage(value: Any, stage: str) -> Any:
    if isinstance(value, Mapping):
        return value.get(stage, value.get("default"))
    return value


def sbatch_arguments(settings: Mapping[str, Any], stage: str) -> List[str]:
    """sbatch's resource arguments of one stage's array."""
    args = []
    for name, flag in (("partition", "--partition"), ("time", "--time"), ("cpus_per_task", "--cpus-per-task"),
                       ("mem", "--mem")):
        value = _for_stage(settings.get(name), stage)
        if value is not None:
            args.append(f"{flag}={value}")
    gpus = int(_for_stage(settings.get("gpus"), stage) or 0)
    if gpus > 0:
        args.append(f"--gpus-per-node={gpus}")
    extra = _for_stage(settings.get("extra"), stage) or []
    return args + [str(a) for a in (extra if isinstance(extra, list) else shlex.split(str(extra)))]


def array_groups(graph: Graph, pending: Sequence[Stage]) -> Dict[str, List[Stage]]:
    """The pending stages by array, checking that every dependency is done or in an earlier array."""
    groups: Dict[str, List[Stage]] = {name: [] for name in ARRAY_ORDER}
    for stage in pending:
        groups[stage.stage].append(stage)
    position = {stage.key: ARRAY_ORDER.index(stage.stage) for stage in pending}
    for stage in pending:
        for dep in stage.deps:
            if dep in position and position[dep] >= position[stage.key]:
                raise UserError(f"{stage.label} depends on {graph.stages[dep].label} in the same or a later array "
                                f"({graph.stages[dep].stage}); run this plan locally")
    return {name: stages for name, stages in groups.items() if stages}


def submit(graph: Graph, python: str, markers: Markers, settings: Mapping[str, Any], sbatch: str = "sbatch",
           say: Callable[[str], None] = print) -> List[Submission]:
    """Submit every stage that is not done; returns the arrays submitted, in order."""
    pending = [stage for stage in graph.stages.values() if not markers.done(stage)]
    busy = [stage.label for stage in pending if markers.running(stage.key) is not None]
    if busy:
        raise UserError(f"{len(busy)} stage(s) of this plan are running ({busy[0]}); submit once they have stopped")
    if not pending:
        say("every stage is done; nothing to submit")
        return []
    folder = os.path.join(markers.root, "slurm")
    os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    submissions: List[Submission] = []
    for stage_name, stages in array_groups(graph, pending).items():
        gpus = int(_for_stage(settings.get("gpus"), stage_name) or 0)
        prefix = os.path.join(folder, f"{graph.plan.name}-{stamp}-{stage_name}")
        with open(prefix + ".tasks.jsonl", "w") as fh:
            for stage in stages:
                fh.write(json.dumps(_task(stage, python, markers, gpus)) + "\n")
        with open(prefix + ".sh", "w") as fh:
            fh.write(_job_script(graph.plan.name, stage_name, len(stages), python, prefix + ".tasks.jsonl"))
        throttle = _for_stage(settings.get("max_parallel"), stage_name)
        array = f"0-{len(stages) - 1}" + (f"%{int(throttle)}" if throttle else "")
        args = ["--parsable", f"--job-name=harp-{graph.plan.name}-{stage_name}", f"--array={array}",
                f"--output={os.path.join(folder, 'logs', '%x-%A_%a.out')}"]
        args += sbatch_arguments(settings, stage_name)
        if submissions:
            args += [f"--dependency=afterok:{submissions[-1].job_id}", "--kill-on-invalid-dep=yes"]
        job_id = _sbatch(sbatch, args + [prefix + ".sh"])
        submissions.append(Submission(stage_name, job_id, [s.key for s in stages], prefix + ".tasks.jsonl", args))
        after = f", after job {submissions[-2].job_id}" if len(submissions) > 1 else ""
        say(f"{stage_name}: job array {job_id} with {len(stages)} task(s){after}")
    return submissions


def _task(stage: Stage, python: str, markers: Markers, gpus: int) -> Dict[str, Any]:
    command = stage.command(python)
    if stage.kind == TRAIN and gpus > 1:  # one node, one process per GPU (DistributedDataParallel)
        command = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                   stage.script, *stage.argv]
    return {"key": stage.key, "label": stage.label, "command": command, "markers": markers.root,
            "result": stage.result, "checkpoint": stage.checkpoint}


def _job_script(plan: str, stage: str, tasks: int, python: str, tasks_file: str) -> str:
    return ("#!/bin/bash\n"
            f"# Written by scripts/reproduce.py: plan {plan}, stage {stage}, {tasks} task(s), one per line of\n"
            f"# {tasks_file}\n"
            "set -euo pipefail\n"
            f"cd {shlex.quote(ROOT)}\n"
            f"exec {shlex.quote(python)} scripts/reproduce.py --exec-task {shlex.quote(tasks_file)} "
            '"${SLURM_ARRAY_TASK_ID}"\n')


def _sbatch(sbatch: str, args: List[str]) -> str:
    try:
        done = subprocess.run([sbatch, *args], capture_output=True, text=True, cwd=ROOT)
    except FileNotFoundError:
        raise UserError(f"{sbatch} not found: is this a SLURM login node? (--sbatch PATH names another)") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise UserError(f"sbatch failed (exit {done.returncode}): {message[-1] if message else 'no output'}")
    job_id = done.stdout.strip().split(";")[0]  # --parsable: "<job id>[;<cluster>]"
    if not job_id.isdigit():
        raise UserError(f"sbatch printed {done.stdout.strip()!r}, not a job id")
    return job_id


def exec_task(tasks_file: str, index: int, say: Callable[[str], None] = print) -> int:
    """One array task: run line `index` of a tasks file with its markers; returns its exit status."""
    try:
        with open(tasks_file) as fh:
            lines = fh.read().splitlines()
    except OSError as err:
        raise UserError(f"cannot read tasks file {tasks_file}: {err.strerror}") from None
    if not 0 <= index < len(lines):
        raise UserError(f"task {index} is not in {tasks_file} ({len(lines)} tasks)")
    task = json.loads(lines[index])
    if task.get("result") and test_done(task["result"], task["checkpoint"]):
        say(f"{task['label']}: done already ({task['result']})")
        return 0
    say(f"{task['label']}: {' '.join(task['command'])}")
    sys.stdout.flush()
    return run_command(task["key"], task["command"], Markers(task["markers"]), echo=say)
