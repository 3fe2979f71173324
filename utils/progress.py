"""tqdm progress bars that switch themselves off when stderr is not a terminal or when asked."""
import sys
from typing import Iterable, Optional

from tqdm import tqdm


def progress(iterable: Iterable, *, total: Optional[int] = None, desc: str = "", enabled: bool = True,
             leave: bool = False) -> tqdm:
    return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))
