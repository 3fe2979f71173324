"""The import layering of ARCHITECTURE.md, and the rules for library code, checked on the source with `ast`."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("configs", "utils", "data", "models", "pruning", "strategies", "trainers")
# Layer 5: the entry points and the stage set-up they share. They may import every package; an entry point never
# imports another one (test.py must not import train.py), and no package imports any of them.
ENTRY_POINTS = ("train", "test")
COMPOSITION = ("stage",)

# package -> project packages it may import (its own included). Pruning works on any nn.Module, so it knows neither
# models, data nor strategies. Strategies owns every per-layer rate source, the search included, which measures
# layers with pruning's cost model: it sits above pruning beside trainers (L4), and neither imports the other.
ALLOWED = {
    "configs": {"configs"},
    "utils": {"utils", "configs"},
    "data": {"data", "utils", "configs"},
    "models": {"models", "utils", "configs"},
    "pruning": {"pruning", "utils", "configs"},
    "strategies": {"strategies", "pruning", "utils", "configs"},
    "trainers": {"trainers", "pruning", "utils", "configs"},
}


# Rooms inside trainers/: attack algorithms and certification import neither the training loops nor evaluation
# (room -> the trainers subpackages it may import). The loops and evaluation build on them, never the reverse.
ROOMS = {
    "trainers.attacks": {"trainers.attacks"},
    "trainers.certify": {"trainers.certify", "trainers.attacks"},
}


def _library_files():
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    yield package, os.path.join(directory, name)


def _imported_modules(path):
    """(dotted module name, line) of every absolute import in the file."""
    tree = ast.parse(open(path).read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno


def _project_imports(path):
    for module, line in _imported_modules(path):
        yield module.split(".")[0], line


def _room_of(module):
    """The room of trainers/ a dotted module belongs to (`trainers.attacks.fmn` -> `trainers.attacks`)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "trainers" and len(parts) > 2 else module


LIBRARY_FILES = sorted(_library_files())


def test_every_package_is_checked():
    assert {package for package, _ in LIBRARY_FILES} == set(PACKAGES)


@pytest.mark.parametrize("package,path", LIBRARY_FILES, ids=[os.path.relpath(p, ROOT) for _, p in LIBRARY_FILES])
def test_imports_follow_the_layering(package, path):
    for module, line in _project_imports(path):
        if module in PACKAGES or module in ENTRY_POINTS + COMPOSITION:
            assert module in ALLOWED[package], (
                f"{os.path.relpath(path, ROOT)}:{line} imports {module}; {package} may import only {sorted(ALLOWED[package])}")


ROOM_FILES = [(room, path) for room in ROOMS
              for directory, _, names in os.walk(os.path.join(ROOT, *room.split(".")))
              for path in sorted(os.path.join(directory, n) for n in names if n.endswith(".py"))]


def test_every_room_has_files():
    assert {room for room, _ in ROOM_FILES} == set(ROOMS)


@pytest.mark.parametrize("room,path", ROOM_FILES, ids=[os.path.relpath(p, ROOT) for _, p in ROOM_FILES])
def test_attacks_and_certification_import_neither_the_loops_nor_evaluation(room, path):
    for module, line in _imported_modules(path):
        if module.split(".")[0] == "trainers":
            assert _room_of(module) in ROOMS[room], (
                f"{os.path.relpath(path, ROOT)}:{line} imports {module}; {room} may import only "
                f"{sorted(ROOMS[room])} of trainers")


@pytest.mark.parametrize("package,path", LIBRARY_FILES, ids=[os.path.relpath(p, ROOT) for _, p in LIBRARY_FILES])
def test_library_code_neither_prints_nor_reads_argv_or_environment(package, path):
    tree = ast.parse(open(path).read(), filename=path)
    where = os.path.relpath(path, ROOT)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "print", f"{where}:{node.lineno} prints; use logging"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            pair = (node.value.id, node.attr)
            assert pair not in {("sys", "argv"), ("os", "environ"), ("os", "getenv"), ("sys", "exit")}, (
                f"{where}:{node.lineno} uses {'.'.join(pair)}; only train.py/test.py may")


@pytest.mark.parametrize("module", ENTRY_POINTS + COMPOSITION)
def test_entry_points_import_no_other_entry_point(module):
    path = os.path.join(ROOT, f"{module}.py")
    allowed = set(PACKAGES) | (set(COMPOSITION) if module in ENTRY_POINTS else set())
    for imported, line in _project_imports(path):
        if imported in ENTRY_POINTS + COMPOSITION:
            assert imported in allowed, f"{module}.py:{line} imports {imported}"


def test_the_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import models\nfrom data import build_data\n")
    assert [m for m, _ in _project_imports(str(bad))] == ["models", "data"]
    assert "models" not in ALLOWED["pruning"] and "data" not in ALLOWED["models"]


def test_the_room_checker_catches_an_attack_that_imports_a_loop_or_evaluation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from trainers.engine import ObjectiveLoop\nimport trainers.evaluation.registry\n")
    rooms = [_room_of(m) for m, _ in _imported_modules(str(bad))]
    assert rooms == ["trainers.engine", "trainers.evaluation"]
    assert not set(rooms) & ROOMS["trainers.attacks"] and not set(rooms) & ROOMS["trainers.certify"]
