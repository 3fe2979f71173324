"""The relative links of README.md, docs/*.md and ARCHITECTURE.md lead somewhere: the file exists and, with a
`#fragment`, one of its headings has that anchor (as GitHub derives anchors from headings)."""
import os
import re
from typing import Dict, List, Set, Tuple

import pytest

from tests.conftest import ROOT
from tests.docs_pages import DOC_FILES, code_blocks

PAGES = DOC_FILES + [os.path.join(ROOT, "ARCHITECTURE.md")]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def prose(path: str) -> List[Tuple[int, str]]:
    """(1-based line number, text) of every line outside code blocks."""
    lines = open(path, encoding="utf-8").read().splitlines()
    in_blocks = {i for _, _, covered in code_blocks(lines) for i in covered}
    return [(i + 1, line) for i, line in enumerate(lines) if i not in in_blocks]


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (word characters, '-' and ' ' kept), spaces
    to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> Set[str]:
    seen: Dict[str, int] = {}
    found = set()
    for _, line in prose(path):
        heading = HEADING.match(line)
        if heading:
            base = anchor(heading.group(1))
            found.add(base if base not in seen else f"{base}-{seen[base]}")  # GitHub numbers repeated headings
            seen[base] = seen.get(base, 0) + 1
    return found


def relative_links(path: str) -> List[Tuple[int, str]]:
    return [(number, target) for number, line in prose(path) for target in LINK.findall(line)
            if not re.match(r"^[a-z]+:", target)]


LINKS = [(path, number, target) for path in PAGES for number, target in relative_links(path)]


def test_the_pages_link_to_each_other():
    targets = {os.path.normpath(os.path.join(os.path.dirname(p), t.split("#")[0])) for p, _, t in LINKS}
    assert set(DOC_FILES) - {os.path.join(ROOT, "README.md")} <= targets, "a docs page nothing links to"


@pytest.mark.parametrize("path,number,target", LINKS,
                         ids=[f"{os.path.relpath(p, ROOT)}:{n}:{t}" for p, n, t in LINKS])
def test_relative_link_resolves(path, number, target):
    where = f"{os.path.relpath(path, ROOT)}:{number}"
    file_part, _, fragment = target.partition("#")
    linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
    assert os.path.exists(linked), f"{where}: link {target!r}: {os.path.relpath(linked, ROOT)} does not exist"
    if fragment:
        assert linked.endswith(".md"), f"{where}: link {target!r}: a fragment into a file that is not Markdown"
        assert fragment in anchors(linked), (
            f"{where}: link {target!r}: no heading of {os.path.relpath(linked, ROOT)} has the anchor #{fragment}")


def test_anchor_follows_github():
    assert anchor("Quick start (2-core CPU, no download)") == "quick-start-2-core-cpu-no-download"
    assert anchor("The original repository's commands") == "the-original-repositorys-commands"
    assert anchor("Strategy search (`scripts/search_strategy.py`)") == "strategy-search-scriptssearch_strategypy"
