"""Every command line that README.md and docs/*.md show parses, so no documented flag can rot.

A command is a `python train.py|test.py|scripts/<name>.py ...` line (also behind `torchrun ...`, an environment
assignment, `timeout ...` or `.venv/bin/python`), or an `sbatch ... scripts/slurm_harp.sbatch ...` line (its
arguments are train.py's), in a code block, fenced or indented, or in an inline code span. Nothing trains: train.py
and test.py lines go through the config resolver with the registries' choices, as the entry points do (test.py's
attack list through the attack registry too); a script line goes through the script's `parse(argv)` where it
resolves a run's config as well, else through its `build_parser()`.
"""
import contextlib
import functools
import io
import os
import re
import shlex
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import pytest

from configs.cli import resolve_config
from configs.errors import UserError
from stage import option_choices
from tests.conftest import ROOT, load_entry_point
from tests.docs_pages import DOC_FILES, code_blocks
from trainers.evaluation.registry import parse_attacks, wants_help

ENTRY_POINTS = {"train.py": "train", "test.py": "test"}  # entry point -> its config scope
WRAPPERS = {"scripts/slurm_harp.sbatch": "train.py"}     # passes every argument to train.py
SCRIPT = re.compile(r"^(?:\./)?(train\.py|test\.py|scripts/\w+\.py|scripts/slurm_harp\.sbatch)$")
LAUNCHERS = re.compile(r"^(?:\S*/)?(?:python3?(?:\.\d+)?|torchrun|sbatch)$")
CAPTURED = re.compile(r"^\w+=\$\((.*)\)$")  # jid=$(sbatch ...): the command inside
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "<", "2>", "2>&1"}
ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(\S*)$")
INLINE_CODE = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class Command:
    path: str             # relative to the repository root
    line: int             # 1-based line of the command's first line
    script: str           # train.py, test.py, scripts/<name>.py or scripts/slurm_harp.sbatch
    argv: Tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def text(self) -> str:
        return " ".join(["sbatch" if self.script in WRAPPERS else "python", self.script, *self.argv])


# ----------------------------------------------------------------------------------------------- extraction
def logical_lines(first: int, block: Sequence[str]) -> Iterator[Tuple[int, str]]:
    """(0-based index, text) of each shell line, a trailing backslash joining the next line to it."""
    start, parts = None, []
    for offset, raw in enumerate(block):
        text = raw.strip()
        if start is None:
            start = first + offset
        if text.endswith("\\"):
            parts.append(text[:-1])
            continue
        parts.append(text)
        yield start, " ".join(parts)
        start, parts = None, []
    if parts:
        yield start, " ".join(parts)


def inline_spans(lines: Sequence[str], in_blocks: set) -> Iterator[Tuple[int, str]]:
    """(0-based index, text) of each inline code span outside code blocks; a span may wrap onto the next line."""
    prose = "\n".join("" if i in in_blocks else line for i, line in enumerate(lines))
    for match in INLINE_CODE.finditer(prose):
        yield prose.count("\n", 0, match.start()), match.group(1).replace("\n", " ")


def split_command(text: str, variables: dict) -> Optional[Tuple[str, List[str]]]:
    """(script, argv) when `text` runs one of ours, after the shell's comment stripping and `$NAME` expansion."""
    captured = CAPTURED.match(text.strip())
    if captured:
        text = captured.group(1)
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:  # unbalanced quotes: not a shell line (e.g. prose in a span)
        return None
    scripts = [i for i, token in enumerate(tokens) if SCRIPT.match(token)]
    # a launcher before the script, after any prefix such as `OMP_NUM_THREADS=1` or `timeout -s INT 150`
    if not scripts or not any(LAUNCHERS.match(token) for token in tokens[:scripts[0]]):
        return None
    argv = []
    for token in tokens[scripts[0] + 1:]:
        if token in SHELL_OPERATORS:
            break
        argv.append(re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), token))
    return SCRIPT.match(tokens[scripts[0]]).group(1), argv


def documented_commands(path: str, text: Optional[str] = None) -> List[Command]:
    """Every command of ours that the Markdown file at `path` shows, in order of lines."""
    lines = (open(path, encoding="utf-8").read() if text is None else text).splitlines()
    relative = os.path.relpath(path, ROOT)
    found, in_blocks = [], set()
    for first, block, covered in code_blocks(lines):
        in_blocks.update(covered)
        variables = {}  # NAME=value lines of the block (e.g. STG=...), expanded in the lines after them
        for index, line in logical_lines(first, block):
            assignment = ASSIGNMENT.match(line)
            if assignment:
                variables[assignment.group(1)] = assignment.group(2)
            command = split_command(line, variables)
            if command:
                found.append(Command(relative, index + 1, command[0], tuple(command[1])))
    for index, span in inline_spans(lines, in_blocks):
        command = split_command(span, {})
        if command:
            found.append(Command(relative, index + 1, command[0], tuple(command[1])))
    return sorted(found, key=lambda c: c.line)


# ----------------------------------------------------------------------------------------------- parsing
@functools.lru_cache(maxsize=None)
def script_module(script: str):
    return load_entry_point(script, "harp_docs_" + os.path.basename(script)[:-3])


def parse(script: str, argv: Sequence[str]) -> None:
    """Parse `argv` as `script` does before it does any work; raises UserError or SystemExit on bad input."""
    script = WRAPPERS.get(script, script)
    if script in ENTRY_POINTS:
        cfg, _ = resolve_config(list(argv), ENTRY_POINTS[script], script, choices=option_choices())
        if script == "test.py" and not wants_help(cfg.attacks):  # test.py answers --attacks help before parsing
            parse_attacks(cfg.attacks)
        return
    module = script_module(script)
    if hasattr(module, "parse"):
        module.parse(list(argv))
    elif hasattr(module, "build_parser"):
        module.build_parser().parse_args(list(argv))
    else:
        raise UserError(f"{script} exposes neither parse(argv) nor build_parser(), so its documented commands "
                        "cannot be checked")


def parse_error(script: str, argv: Sequence[str]) -> Optional[str]:
    """None when `argv` parses (--help included), else the one-line error the entry point would print."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            parse(script, argv)
    except UserError as err:
        return str(err)
    except SystemExit as exit_:
        if exit_.code in (0, None):
            return None
        return (stderr.getvalue().strip().splitlines() or [f"exit status {exit_.code}"])[-1]
    return None


def flag_groups(argv: Sequence[str]) -> List[Tuple[int, int]]:
    """[start, end) of each flag with the values after it."""
    starts = [i for i, token in enumerate(argv) if token.startswith("-") and not re.match(r"^-\d", token)]
    return [(start, end) for start, end in zip(starts, starts[1:] + [len(argv)])]


def culprit(script: str, argv: Sequence[str], error: str) -> str:
    """The flag the error is about: the first one the message names, else the first whose removal lets the line
    parse."""
    named = {}
    for start, _ in flag_groups(argv):
        flag = argv[start].split("=")[0]
        mention = re.search(re.escape(flag) + r"(?![\w-])", error)
        if mention:
            named[flag] = mention.start()
    if named:
        return min(named, key=named.get)
    for start, end in flag_groups(argv):
        if parse_error(script, list(argv[:start]) + list(argv[end:])) is None:
            return argv[start].split("=")[0]
    return "(no single flag: the arguments as a whole)"


def check(command: Command) -> None:
    error = parse_error(command.script, command.argv)
    if error is not None:
        pytest.fail(f"{command.where}: flag {culprit(command.script, command.argv, error)}: {error}\n"
                    f"    {command.text}", pytrace=False)


COMMANDS = [command for path in DOC_FILES for command in documented_commands(path)]


# ----------------------------------------------------------------------------------------------- the docs
@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_parses(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # documented paths (configs/..., scripts/plans/...) are relative to the repository root
    check(command)


def test_the_readme_and_the_docs_show_commands_of_every_kind():
    assert {"README.md", "docs/pipeline.md", "docs/evaluation.md"} <= {c.path for c in COMMANDS}
    assert {"train.py", "test.py", "scripts/reproduce.py", "scripts/make_tables.py"} <= {c.script for c in COMMANDS}


def test_ci_runs_the_readme_setup_and_test_commands():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ci = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8")
          if line.strip() and not line.lstrip().startswith("#")]
    for command in ("bash scripts/setup.sh", ".venv/bin/python -m pytest -q tests"):
        assert f"\n{command}\n" in readme, f"README.md does not show {command!r} in a code block"
        assert command in ci, f".ci/run does not run the README's {command!r}"


# ----------------------------------------------------------------------------------------------- the checker itself
SAMPLE = """# page

```bash
STG=runs/strategy.yaml:evolution_0.05
python train.py --dataset digits --exp-mode score_prune \\
    --k 0.05 --stg_id $STG      # a comment, not an argument
OMP_NUM_THREADS=1 timeout 60 .venv/bin/python test.py --dataset digits --exp-mode pretrain --attacks pgd10 > out
torchrun --standalone --nproc-per-node 4 train.py --dataset digits --epochs 2
bash scripts/quickstart.sh
jid=$(sbatch --parsable --dependency=afterok:$jid scripts/slurm_harp.sbatch --dataset digits \\
      --exp-mode harp_prune --k 0.1)
```

Indented:

    python scripts/make_tables.py trained_models --attack pgd10
    plan digits: 13 cells

Inline, wrapped: `python train.py --dataset digits
--epoch 5` and `--not-a-command`.
"""


def test_extraction_joins_continuations_drops_comments_and_expands_variables(tmp_path):
    page = tmp_path / "page.md"
    commands = documented_commands(str(page), SAMPLE)
    assert [(c.line, c.script, c.argv) for c in commands] == [
        (5, "train.py", ("--dataset", "digits", "--exp-mode", "score_prune", "--k", "0.05", "--stg_id",
                         "runs/strategy.yaml:evolution_0.05")),
        (7, "test.py", ("--dataset", "digits", "--exp-mode", "pretrain", "--attacks", "pgd10")),
        (8, "train.py", ("--dataset", "digits", "--epochs", "2")),
        (10, "scripts/slurm_harp.sbatch", ("--dataset", "digits", "--exp-mode", "harp_prune", "--k", "0.1")),
        (16, "scripts/make_tables.py", ("trained_models", "--attack", "pgd10")),
        (19, "train.py", ("--dataset", "digits", "--epoch", "5")),
    ]


@pytest.mark.parametrize("script,argv,flag", [
    ("train.py", ["--dataset", "digits", "--epoch", "5"], "--epoch"),             # a typo of --epochs
    ("train.py", ["--dataset", "digits", "--exp-mode", "harp_prune"], "--exp-mode"),  # --k missing: the mode needs it
    ("test.py", ["--dataset", "digits", "--attacks", "natural,pgd7"], "--attacks"),
    ("scripts/make_tables.py", ["trained_models", "--format", "html"], "--format"),
    ("scripts/reproduce.py", ["plan.yaml", "--status", "--collect"], "--collect"),
    ("scripts/slurm_harp.sbatch", ["--dataset", "digits", "--trainer", "fastest"], "--trainer"),
])
def test_a_bad_command_fails_naming_file_line_and_flag(script, argv, flag):
    command = Command("docs/page.md", 12, script, tuple(argv))
    with pytest.raises(pytest.fail.Exception) as failure:
        check(command)
    message = str(failure.value)
    assert message.startswith(f"docs/page.md:12: flag {flag}:"), message


def test_a_good_command_and_help_pass():
    check(Command("docs/page.md", 1, "train.py", ("--dataset", "digits", "--exp-mode", "harp_prune", "--k", "0.01")))
    check(Command("docs/page.md", 2, "scripts/plots.py", ("keep-rates", "a.pth.tar", "-o", "k.png")))
    check(Command("docs/page.md", 3, "test.py", ("--dataset", "digits", "--help")))
