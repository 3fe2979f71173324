"""The one atomic-write helper: write to a temporary file in the target's directory, then rename over it.

A crash (or a kill) mid-write never leaves half a file where a checkpoint, a result JSON or metrics.jsonl
should be: readers see the old file or the new one.
"""
import os
import tempfile
from typing import BinaryIO, Callable, TextIO, Union


def new_file_mode() -> int:
    """The permissions open() gives a new file: 0o666 less the process umask. mkstemp's files are 0600, which
    would hide checkpoints and results from the group on a shared cluster filesystem."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write: Callable[[Union[BinaryIO, TextIO]], None], *, binary: bool = False) -> None:
    """Call `write(fh)` on a temporary file beside `path`, flush it to disk, and rename it to `path` (with the
    permissions a plain open() would have given it)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
