"""Every error a user sees is one line of at most MAX_LINE characters, the paths it names aside.

Two scans: the fixed text of every `UserError` raised in the toolkit's code (the part its author controls; with the
longest `<script>: error: ` prefix), and the full lines of the errors that users met when they were too long or
named the wrong thing (an unknown --stg_id rule, search_strategy.py without --k, bad plans).
"""
import ast
import os

import pytest

from strategies import parse_strategy_id
from tests.conftest import ROOT, load_entry_point

search = load_entry_point("scripts/search_strategy.py", "harp_search_strategy_errors")

MAX_LINE = 200
PREFIX = "search_strategy.py: error: "  # the longest script name in front of an error


def _literal_text(node) -> str:
    """The fixed characters of a message expression: string constants, f-string text, their concatenations."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_literal_text(part) for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _literal_text(node.left) + _literal_text(node.right)
    return ""


def _user_error_texts():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "datasets", "trained_models")]
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "UserError" and node.args:
                    yield f"{os.path.relpath(path, ROOT)}:{node.lineno}", _literal_text(node.args[0])


def test_the_fixed_text_of_every_error_fits_one_line():
    texts = list(_user_error_texts())
    assert len(texts) > 100  # the scan finds the toolkit's errors
    too_long = [where for where, text in texts if "\n" in text or len(PREFIX + text) > MAX_LINE]
    assert not too_long


def test_an_unknown_strategy_rule_is_a_short_line():
    with pytest.raises(Exception) as info:
        parse_strategy_id("010_foo")
    line = f"train.py: error: {info.value}"
    assert len(line) <= MAX_LINE and "rule 'foo'" in line and "uni|erk|lamp" in line


def test_search_strategy_without_k_asks_for_k_not_for_a_mode(capsys):
    assert search.main(["--dataset", "digits", "--trainer", "base"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("search_strategy.py: error: --k is required") and "score_prune" not in line
    assert len(line) <= MAX_LINE
