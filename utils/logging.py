"""Logging set-up (a human log file plus the console) and the metrics.jsonl writer."""
import json
import logging
import os
import sys
from typing import Any, Dict, Iterable

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(log_file: str = None, level: int = logging.INFO) -> None:
    """Console on stderr always; append to `log_file` when given. Safe to call more than once."""
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, "_harp", False):
            root.removeHandler(handler)
            handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    handlers = [console]
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        handlers.append(file_handler)
    for handler in handlers:
        handler._harp = True
        root.addHandler(handler)


def write_jsonl(path: str, records: Iterable[Dict[str, Any]]) -> None:
    """Rewrite the whole metrics file atomically from the checkpoint's history (stays consistent on resume)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        for record in records:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
    os.replace(tmp, path)
