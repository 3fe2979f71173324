"""Running a plan's stages on this machine, one at a time in dependency order.

A finished stage is skipped without starting a process; a stage whose dependency failed (or is running elsewhere)
is not started, and neither are its dependents; every other stage runs its command. train.py itself resumes an
interrupted run (same command, same run directory) and --skip-finished makes a finished one a no-op, so rerunning
a plan after a crash, a Ctrl-C or a SIGKILL finishes only what is missing.
"""
import collections
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from scripts.reproduction.plan import Graph, Stage
from scripts.reproduction.state import HEARTBEAT_S, Markers
from utils.logging import WARNING_PREFIX

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TAIL_LINES = 20            # output lines kept for the failure summary
INTERRUPT_GRACE_S = 60.0   # after Ctrl-C, how long the stage's process may take to stop by itself


class Interrupted(Exception):
    """SIGINT or SIGTERM while a stage ran: its process was stopped and the run can be resumed."""


@dataclass
class Outcome:
    """What a local run did with each stage."""
    skipped: List[str] = field(default_factory=list)        # already done
    succeeded: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)     # key -> reason
    blocked: Dict[str, str] = field(default_factory=dict)    # key -> why it was not started

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when the runner dies, even by SIGKILL, so a stage never keeps
    writing into a run directory that a rerun will resume."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_command(key: str, command: Sequence[str], markers: Markers, echo: Optional[Callable[[str], None]] = None,
                cwd: str = ROOT) -> int:
    """Run one stage's command with its markers (running while it runs, failed if it exits non-zero), its output
    appended to the stage's log and passed to `echo` line by line. Returns the exit status.

    Raises Interrupted on SIGINT/SIGTERM after stopping the command (the stage is left unfinished, not failed).
    """
    log_path = markers.log_path(key)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    markers.start(key, list(command))
    stop = threading.Event()
    beating = threading.Thread(target=_heartbeat, args=(markers, key, stop), daemon=True)
    beating.start()
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    process = None
    returncode = None
    try:
        with open(log_path, "a") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
            log.flush()
            process = subprocess.Popen(list(command), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1,
                                       preexec_fn=_die_with_parent)
            for line in process.stdout:
                log.write(line)
                log.flush()
                tail.append(line.rstrip("\n"))
                if echo is not None:
                    echo(line.rstrip("\n"))
            returncode = process.wait()
    except (KeyboardInterrupt, Interrupted):
        if process is not None:
            _stop(process)
        raise Interrupted(key) from None
    finally:
        stop.set()
        if returncode is None:
            markers.finish(key, 0, [])  # interrupted: neither running nor failed, so a rerun resumes it
        else:
            markers.finish(key, returncode, list(tail))
    return returncode


def _heartbeat(markers: Markers, key: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        markers.beat(key)


def _stop(process: subprocess.Popen) -> None:
    """Let the stage stop by itself (a terminal's Ctrl-C reached it too), else interrupt it, then kill it."""
    steps = ((2.0, None), (INTERRUPT_GRACE_S, lambda: process.send_signal(signal.SIGINT)), (10.0, process.kill))
    for wait, action in steps:
        if process.poll() is not None:
            return
        if action is not None:
            action()
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_graph(graph: Graph, python: str, markers: Markers, say: Callable[[str], None],
              echo: Optional[Callable[[str], None]] = None, done: Optional[Callable[[Stage], bool]] = None) -> Outcome:
    """Run every stage that is not `done` (default: markers.done), in dependency order, continuing past failures
    (their dependents are skipped). `say` gets one line per stage; `echo` (or nothing) each line of the stages'
    output."""
    done = done or markers.done
    outcome = Outcome()
    stages = list(graph.stages.values())
    for number, stage in enumerate(stages, 1):
        where = f"[{number}/{len(stages)}] {stage.label}"
        waiting = [dep for dep in stage.deps if dep in outcome.failed or dep in outcome.blocked]
        if waiting:
            outcome.blocked[stage.key] = f"it needs {graph.stages[waiting[0]].label}"
            say(f"{where}: not started, {outcome.blocked[stage.key]}")
            continue
        if done(stage):
            outcome.skipped.append(stage.key)
            say(f"{where}: done")
            continue
        live = markers.running(stage.key)
        if live is not None:
            outcome.blocked[stage.key] = f"it is running elsewhere ({live.get('host')} pid {live.get('pid')})"
            say(f"{where}: not started, {outcome.blocked[stage.key]}")
            continue
        say(f"{where}: {' '.join(stage.command(python))}")
        started = time.time()
        warnings: List[str] = []
        returncode = run_command(stage.key, stage.command(python), markers, _noting_warnings(warnings, echo))
        seconds = time.time() - started
        if returncode == 0 and done(stage):
            outcome.succeeded.append(stage.key)
            say(f"{where}: finished in {seconds:.0f}s")
            for line in dict.fromkeys(warnings):  # a finished stage can still have gone wrong: never only "finished"
                say(f"{where}: {line}")
            continue
        reason = f"exit {returncode}" if returncode else "exited 0 but left no finished result"
        failure = markers.failed(stage.key) or {}
        if returncode == 0:
            markers.finish(stage.key, 1, [reason])
        outcome.failed[stage.key] = f"{reason}: {_last(failure.get('tail'))} (log {markers.log_path(stage.key)})"
        say(f"{where}: FAILED ({reason}) after {seconds:.0f}s; log {markers.log_path(stage.key)}")
    return outcome


def _noting_warnings(warnings: List[str], echo: Optional[Callable[[str], None]]) -> Callable[[str], None]:
    """An echo that also keeps the stage's warning lines (utils.logging.WARNING_PREFIX) for the runner's summary."""
    def note(line: str) -> None:
        if line.startswith(WARNING_PREFIX):
            warnings.append(line)
        if echo is not None:
            echo(line)
    return note


def _last(tail: Optional[List[str]]) -> str:
    lines = [line for line in (tail or []) if line.strip()]
    return lines[-1].strip() if lines else "no output"
