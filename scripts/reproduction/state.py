"""What is known about each stage of a plan: done, running, failed or missing.

done     a train stage whose run directory holds a finished run of exactly its settings
         (utils.run_dir.finished_with_same_settings, the test train.py --skip-finished makes); a test whose result
         file exists and is newer than the checkpoint it evaluated.
running  a `.running` marker that its runner touched within STALE_S seconds. The runner (reproduce.py, locally or
         inside a SLURM array task) writes the marker before it starts the stage's command and touches it every
         HEARTBEAT_S seconds while the command runs; a marker left by a runner that was killed goes stale.
failed   a `.failed` marker: the last attempt exited non-zero (its exit status and last output lines are in it).
missing  anything else; `detail` says whether an interrupted run is there to resume (epochs in metrics.jsonl) or a
         finished run with other settings blocks the directory.

Markers and logs live under <result_dir>/.reproduce/ (shared by every plan that uses that result tree):
  markers/<stage key>.running | .failed     JSON: command, host, pid, start, SLURM job, exit status, output tail
  logs/<stage key>.log                      the command's output
  done.json                                 train stages found done, by the size and time of their last checkpoint
                                            and a hash of their settings (a large plan's --status reads each
                                            checkpoint once, not on every call; any rewrite of the file rechecks)
where a stage key is train/<run dir> or test/<result file> relative to the result directory.
"""
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from configs.schema import config_to_dict
from scripts.reproduction.plan import TRAIN, Graph, Stage
from trainers.evaluation.report import is_complete_result, written_after_checkpoint
from utils.atomic import atomic_write
from utils.checkpoint import load_checkpoint
from utils.run_dir import checkpoint_path, config_differences, finished_with_same_settings

STATE_DIR = ".reproduce"
HEARTBEAT_S = 30.0   # how often a runner touches the marker of the stage it runs
STALE_S = 180.0      # a marker not touched for this long belongs to a runner that is gone
DONE, RUNNING, FAILED, MISSING = "done", "running", "failed", "missing"
STATES = (DONE, RUNNING, FAILED, MISSING)


def state_root(result_dir: str) -> str:
    return os.path.join(result_dir, STATE_DIR)


class Markers:
    """The marker and log files of the stages run under one result directory."""

    def __init__(self, root: str):
        self.root = root

    def _path(self, key: str, suffix: str) -> str:
        return os.path.join(self.root, "markers", key + suffix)

    def log_path(self, key: str) -> str:
        return os.path.join(self.root, "logs", key + ".log")

    def start(self, key: str, command: List[str]) -> None:
        """Before a stage's command starts: a fresh `.running` marker; the previous failure is forgotten."""
        info = {"command": command, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                "slurm_job": _slurm_job_id()}
        _write_json(self._path(key, ".running"), info)
        _remove(self._path(key, ".failed"))

    def beat(self, key: str) -> None:
        try:
            os.utime(self._path(key, ".running"))
        except FileNotFoundError:
            pass

    def finish(self, key: str, returncode: int, tail: List[str]) -> None:
        """After the command: no `.running` marker; a `.failed` one if it exited non-zero."""
        if returncode != 0:
            _write_json(self._path(key, ".failed"), {"returncode": returncode, "ended": time.time(),
                                                     "host": socket.gethostname(), "slurm_job": _slurm_job_id(),
                                                     "tail": tail, "log": self.log_path(key)})
        _remove(self._path(key, ".running"))

    def running(self, key: str, now: Optional[float] = None) -> Optional[Dict]:
        """The live `.running` marker of a stage (touched within STALE_S), else None."""
        path = self._path(key, ".running")
        try:
            age = (time.time() if now is None else now) - os.path.getmtime(path)
        except FileNotFoundError:
            return None
        return _read_json(path) if age <= STALE_S else None

    def failed(self, key: str) -> Optional[Dict]:
        path = self._path(key, ".failed")
        return _read_json(path) if os.path.exists(path) else None

    def done(self, stage: Stage) -> bool:
        """stage_done, remembered for train stages by their last checkpoint's identity and their settings."""
        if stage.kind != TRAIN:
            return stage_done(stage)
        try:
            info = os.stat(checkpoint_path(stage.run_dir, "last"))
        except FileNotFoundError:
            return False
        settings = json.dumps(config_to_dict(stage.cfg), sort_keys=True, default=str)
        identity = [info.st_mtime_ns, info.st_size, hashlib.sha1(settings.encode()).hexdigest()]
        cache_path = os.path.join(self.root, "done.json")
        cache = _read_json(cache_path) if os.path.exists(cache_path) else {}
        if cache.get(stage.key) == identity:
            return True
        if not stage_done(stage):
            return False
        cache[stage.key] = identity
        _write_json(cache_path, cache)
        return True


def _slurm_job_id() -> Optional[str]:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def _write_json(path: str, data: Dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda fh: fh.write(json.dumps(data, indent=1) + "\n"))


def _read_json(path: str) -> Dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}  # a marker being replaced: it exists, its content is not needed


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------------------------- stage states
def test_done(result: str, checkpoint: str) -> bool:
    """test.py wrote this result, with every attack finished, after the checkpoint it evaluates was last written (an
    incomplete result is resumed by running the test again)."""
    return written_after_checkpoint(result, checkpoint) and is_complete_result(result)


def stage_done(stage: Stage) -> bool:
    if stage.kind == TRAIN:
        return finished_with_same_settings(stage.cfg, stage.run_dir)
    return test_done(stage.result, stage.checkpoint)


@dataclass(frozen=True)
class StageState:
    state: str
    detail: str = ""


def stage_state(stage: Stage, markers: Markers) -> StageState:
    if markers.done(stage):
        return StageState(DONE)
    live = markers.running(stage.key)
    if live is not None:
        where = f"job {live['slurm_job']}" if live.get("slurm_job") else f"{live.get('host')} pid {live.get('pid')}"
        return StageState(RUNNING, f"on {where}")
    failure = markers.failed(stage.key)
    if failure is not None:
        return StageState(FAILED, f"exit {failure.get('returncode')}: {_last_line(failure.get('tail') or [])}")
    return StageState(MISSING, _progress(stage))


def _last_line(tail: List[str]) -> str:
    lines = [line for line in tail if line.strip()]
    return lines[-1].strip() if lines else "no output"


def _progress(stage: Stage) -> str:
    """What an unfinished train stage's directory already holds."""
    if stage.kind != TRAIN:
        return ""
    last = checkpoint_path(stage.run_dir, "last")
    if not os.path.exists(last):
        return ""
    ckpt = load_checkpoint(last)
    if ckpt.get("finished"):
        diffs = config_differences(ckpt.get("config", {}), stage.cfg)
        return f"a finished run with other settings is there ({'; '.join(diffs[:3])})"
    return f"interrupted after epoch {ckpt.get('epoch')}; resumes"


def graph_states(graph: Graph, markers: Markers) -> Dict[str, StageState]:
    return {key: stage_state(stage, markers) for key, stage in graph.stages.items()}


def cell_state(stage_keys, states: Dict[str, StageState]) -> str:
    """failed if a stage of the cell failed, else running if one runs, done if all are done, else missing."""
    mine = [states[key].state for key in stage_keys]
    if all(s == DONE for s in mine):
        return DONE
    for state in (FAILED, RUNNING):
        if state in mine:
            return state
    return MISSING
