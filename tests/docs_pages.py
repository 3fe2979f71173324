"""The Markdown pages users read (README.md and docs/*.md), and where their code blocks are."""
import glob
import os
import re
from typing import Iterator, List, Sequence, Tuple

from tests.conftest import ROOT

DOC_FILES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^\s*(```|~~~)")


def code_blocks(lines: Sequence[str]) -> Iterator[Tuple[int, List[str], range]]:
    """(0-based index of the first line, its lines, the indices the block covers with its fences) of each fenced
    block and each indented block (4+ spaces after a blank line, outside fences)."""
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence:
            end = i + 1
            while end < len(lines) and not lines[end].lstrip().startswith(fence.group(1)):
                end += 1
            yield i + 1, lines[i + 1:end], range(i, end + 1)
            i = end + 1
        elif lines[i].startswith("    ") and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            yield i, lines[i:end], range(i, end)
            i = end
        else:
            i += 1
