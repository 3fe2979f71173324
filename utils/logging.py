"""Logging set-up (a human log file plus the console) and the metrics.jsonl writer."""
import json
import logging
import os
import sys
from typing import Any, Dict, Iterable

from utils.atomic import atomic_write

_FORMAT = "%(asctime)s %(levelname)s %(message)s"
WARNING_PREFIX = "warning: "   # what a console warning starts with (scripts/reproduce.py repeats such stage lines)


class _ConsoleFormatter(logging.Formatter):
    """The message alone; warnings and worse start with WARNING_PREFIX so that they stand out, to a reader and to
    a plan runner reading a stage's output."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return WARNING_PREFIX + text if record.levelno >= logging.WARNING else text


class _CurrentStderr(logging.StreamHandler):
    """A console handler that writes to sys.stderr as it is when a record arrives, not as it was at set-up: whoever
    swaps sys.stderr (a test harness capturing each test's output, a notebook) never leaves it writing to a closed
    stream."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):  # StreamHandler.__init__ and setStream assign it; the current sys.stderr always wins
        pass


class _Buffer(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _remove_our_handlers(root: logging.Logger) -> list:
    buffered = []
    for handler in list(root.handlers):
        if getattr(handler, "_harp", False):
            if isinstance(handler, _Buffer):
                buffered = handler.records
            root.removeHandler(handler)
            handler.close()
    return buffered


def buffer_logging(level: int = logging.INFO) -> None:
    """Hold log records back (set-up phase): if set-up fails the user sees only the error line, and nothing
    is written; `setup_logging` later replays them to the console and the log file."""
    root = logging.getLogger()
    root.setLevel(level)
    _remove_our_handlers(root)
    buffer = _Buffer()
    buffer._harp = True
    root.addHandler(buffer)


def setup_logging(log_file: str = None, level: int = logging.INFO) -> None:
    """Console on stderr always; append to `log_file` when given; replays any buffered records."""
    root = logging.getLogger()
    root.setLevel(level)
    buffered = _remove_our_handlers(root)
    console = _CurrentStderr()
    console.setFormatter(_ConsoleFormatter("%(message)s"))
    handlers = [console]
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        handlers.append(file_handler)
    for handler in handlers:
        handler._harp = True
        root.addHandler(handler)
        for record in buffered:
            if record.levelno >= level:
                handler.handle(record)


def write_jsonl(path: str, records: Iterable[Dict[str, Any]]) -> None:
    """Rewrite the whole metrics file atomically from the checkpoint's history (stays consistent on resume)."""
    atomic_write(path, lambda fh: fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records))


def write_json(path: str, obj: Dict[str, Any]) -> None:
    """An indented JSON file (result files), written atomically."""
    def write(fh):
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
    atomic_write(path, write)
