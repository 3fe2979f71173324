"""Strategy files: ``--stg_id FILE[:ID]``, and writing per-layer keep rates to a file.

Two formats, told apart by the file's suffix:

- ``.json``: Heracles' format (Zhao et al., AutoML 2022; intellisec/heracles ``strategies/*.json``),
  ``{arch: {"weight"|"channel": {stg_id: [keep ratio per list position]}}}``. Positions are mapped to
  layers by :mod:`strategies.heracles`; one file may hold several architectures.
- ``.yaml`` / ``.yml``: this toolkit's name-keyed format::

      arch: resnet18
      weight:                    # granularity
        '005_search':            # strategy id (quote it: YAML reads an unquoted 010_0 as a number)
          conv1: 0.81            # module name: keep ratio in (0, 1]
          layer1.0.conv1: 0.22
          ...
      channel:
        ...

  It is the layout of ``strategies/shipped/<arch>.yaml`` (granularity -> id -> layer -> keep) plus the
  ``arch`` it was made for, which the shipped files carry in their file name. So a file converts one to
  one to and from Heracles' JSON, holds an architecture's weight and channel strategies together, and
  a file made for another model fails by name instead of silently misassigning rates.

Every rate is checked to lie in (0, 1] and every file strategy must name exactly the model's prunable
layers. Bad input raises a one-line :class:`UserError`. Files are written atomically (temporary file,
then rename), merged into an existing file of the same format.

Imports only the standard library, ``yaml`` and ``configs.errors`` (plus :mod:`strategies.heracles`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from configs.errors import UserError
from strategies.heracles import GRANULARITIES, checked_keep_ratio, list_from_rates, list_order, rates_from_list

__all__ = ["FILE_SUFFIXES", "FileStrategy", "split_file_strategy", "load_strategy", "read_strategies",
           "save_strategies", "keep_rates_from_sparsity"]

FILE_SUFFIXES = (".json", ".yaml", ".yml")
_FILE_ARG_RE = re.compile(r"^(?P<path>.+\.(?:json|ya?ml))(?::(?P<id>[^:]+))?$", re.IGNORECASE)


@dataclass(frozen=True)
class FileStrategy:
    """A strategy read from a file: where from, its id, and ``{layer name: keep}`` in registration order."""

    path: Path
    stg_id: str
    rates: dict[str, float]

    @property
    def label(self) -> str:
        """``<file stem>-<id>``, a short name for logs and run directories (no ':' or '/')."""
        return f"{self.path.stem}-{self.stg_id}"


def split_file_strategy(value: str) -> tuple[Path, str | None] | None:
    """``(path, id)`` for ``'FILE.yaml:ID'``, ``(path, None)`` for ``'FILE.json'``; None when ``value`` names no
    strategy file (a built-in id such as ``010_uni``). Only the part before the last ``:`` is the path."""
    match = _FILE_ARG_RE.match(value) if isinstance(value, str) else None
    if match is None:
        return None
    return Path(match.group("path")), match.group("id")


def load_strategy(value: str, *, arch: str, granularity: str, layer_names: Sequence[str]) -> FileStrategy:
    """Resolve a ``--stg_id`` value ``FILE:ID`` (or ``FILE`` when the file holds exactly one strategy for
    this arch and granularity) into per-layer keep rates for the model whose prunable layers, in
    registration order, are ``layer_names``.

    Raises a one-line :class:`UserError` for a value that names no strategy file, a missing or unreadable
    file, a file without this arch or granularity, an unknown id (the message lists the ids), a list of
    the wrong length, layer names that do not match, or a rate outside (0, 1].
    """
    split = split_file_strategy(value)
    if split is None:
        raise UserError(f"--stg_id {value!r} names no strategy file; expected FILE:ID or FILE with FILE ending "
                        f"in {', '.join(FILE_SUFFIXES)}")
    path, stg_id = split
    section = _section(path, arch, granularity)
    if stg_id is None:
        if len(section) != 1:
            raise UserError(f"{path} holds {len(section)} {arch} {granularity} strategies; choose one with "
                            f"--stg_id {path}:ID, ID one of {', '.join(sorted(section))}")
        (stg_id,) = section
    elif stg_id not in section:
        raise UserError(f"{path} has no {arch} {granularity} strategy {stg_id!r}; it has {', '.join(sorted(section))}")
    return FileStrategy(path, stg_id, _rates(path, arch, granularity, stg_id, section[stg_id], layer_names))


def read_strategies(path: str | os.PathLike, *, arch: str, granularity: str,
                    layer_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Every strategy in ``path`` for this arch and granularity, as ``{id: {layer name: keep}}`` (ids in file
    order, layers in registration order), checked against ``layer_names``."""
    path = Path(path)
    section = _section(path, arch, granularity)
    return {stg_id: _rates(path, arch, granularity, stg_id, entry, layer_names) for stg_id, entry in section.items()}


def save_strategies(path: str | os.PathLike, strategies: Mapping[str, Mapping[str, float]], *, arch: str,
                    granularity: str, layer_names: Sequence[str], overwrite: bool = False) -> Path:
    """Write ``{id: {layer name: keep}}`` to ``path`` (format by suffix), merged into an existing file.

    ``layer_names`` (registration order) checks the rates and orders the YAML; JSON lists follow
    Heracles' order for ``arch`` (:mod:`strategies.heracles`). An id already in the file with other
    rates is an error unless ``overwrite``. Returns the path written.
    """
    path = Path(path)
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise UserError(f"cannot write strategies to {path}: the file name must end in {', '.join(FILE_SUFFIXES)}")
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown pruning granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)}")
    checked = {}
    for stg_id, rates in strategies.items():
        if not isinstance(stg_id, str) or not stg_id or ":" in stg_id:
            raise UserError(f"strategy id {stg_id!r} must be a non-empty string without ':'")
        checked[stg_id] = _checked_rates(rates, layer_names, f"strategy {stg_id}")

    if _is_json(path):
        order = list_order(arch, granularity, layer_names)
        new = {stg_id: list_from_rates(order, rates, f"strategy {stg_id}") for stg_id, rates in checked.items()}
        document = _read_document(path) if path.exists() else {}
        if not isinstance(document, dict) or not isinstance(document.setdefault(arch, {}), dict):
            raise UserError(f"{path} is not a Heracles strategy file (expected arch -> granularity -> id -> list)")
        parent = document[arch]
    else:
        new = {stg_id: dict(rates) for stg_id, rates in checked.items()}
        document = _read_document(path) if path.exists() else {"arch": arch}
        _check_yaml_top(document, path, arch)
        parent = document
    section = parent.get(granularity) or {}
    if not isinstance(section, dict):
        raise UserError(f"{path}: {granularity} must map strategy ids to strategies")
    parent[granularity] = section
    for stg_id, entry in new.items():
        if stg_id in section and section[stg_id] != entry and not overwrite:
            raise UserError(f"{path} already has a different {arch} {granularity} strategy {stg_id!r}; choose "
                            f"another id or overwrite it")
        section[stg_id] = entry
    _write_atomically(path, document)
    return path


def keep_rates_from_sparsity(report: Mapping) -> dict[str, float]:
    """``{layer name: keep}`` from a sparsity report (``pruning.wrap.sparsity_report``, saved in checkpoints
    as ``checkpoint['sparsity']``): each layer's exact kept fraction ``per_layer[name]['keep']``."""
    per_layer = report.get("per_layer") if isinstance(report, Mapping) else None
    if not isinstance(per_layer, Mapping) or not per_layer:
        raise UserError("the sparsity report has no per-layer keep rates ('per_layer')")
    return {name: checked_keep_ratio(entry.get("keep") if isinstance(entry, Mapping) else None, f"layer {name} keep")
            for name, entry in per_layer.items()}


# ------------------------------------------------------------------------------------------------ helpers


def _section(path: Path, arch: str, granularity: str) -> dict[str, object]:
    """The file's raw ``{id: list or layer mapping}`` for this arch and granularity (entries not yet checked)."""
    document = _read_document(path)
    if _is_json(path):
        return _heracles_section(document, path, arch, granularity)
    return _yaml_section(document, path, arch, granularity)


def _rates(path: Path, arch: str, granularity: str, stg_id: str, entry: object,
           layer_names: Sequence[str]) -> dict[str, float]:
    """One file entry as checked ``{layer name: keep}`` in registration order."""
    if _is_json(path):
        order = list_order(arch, granularity, layer_names)
        return rates_from_list(order, entry, f"{path}: {arch}/{granularity}/{stg_id}")
    return _checked_rates(entry, layer_names, f"{path}: {granularity}/{stg_id}")


def _is_json(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def _read_document(path: Path) -> object:
    if not path.is_file():
        raise UserError(f"strategy file {path} does not exist")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f) if _is_json(path) else yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError) as e:  # json.JSONDecodeError is a ValueError
        kind = "JSON" if _is_json(path) else "YAML"
        raise UserError(f"strategy file {path} is not valid {kind}: {' '.join(str(e).split())}") from None


def _heracles_section(document: object, path: Path, arch: str, granularity: str) -> dict[str, list]:
    if not isinstance(document, dict):
        raise UserError(f"{path} is not a Heracles strategy file (expected a JSON object of architectures)")
    if arch not in document:
        raise UserError(f"{path} has no strategies for arch {arch!r}; it has {_listing(document)}")
    by_granularity = document[arch]
    if not isinstance(by_granularity, dict) or granularity not in by_granularity:
        have = _listing(by_granularity) if isinstance(by_granularity, dict) else "no granularities"
        raise UserError(f"{path} has no {granularity} strategies for {arch}; it has {have}")
    lists = by_granularity[granularity]
    if not isinstance(lists, dict) or not lists:
        raise UserError(f"{path}: {arch}/{granularity} must map strategy ids to lists of keep ratios")
    return lists


def _check_yaml_top(document: object, path: Path, arch: str) -> None:
    if not isinstance(document, dict) or "arch" not in document:
        raise UserError(f"{path} is not a strategy file: expected a mapping with 'arch' and granularity keys")
    unknown = sorted(str(k) for k in document if k != "arch" and k not in GRANULARITIES)
    if unknown:
        raise UserError(f"{path}: unknown keys {unknown}; expected 'arch' and {', '.join(GRANULARITIES)}")
    if document["arch"] != arch:
        raise UserError(f"{path} was made for arch {document['arch']!r}, not {arch!r}")


def _yaml_section(document: object, path: Path, arch: str, granularity: str) -> dict[str, Mapping]:
    _check_yaml_top(document, path, arch)
    section = document.get(granularity)
    if not section:
        have = [g for g in GRANULARITIES if document.get(g)]
        raise UserError(f"{path} has no {granularity} strategies for {arch}; it has {', '.join(have) or 'none'}")
    if not isinstance(section, dict):
        raise UserError(f"{path}: {granularity} must map strategy ids to layer -> keep ratio mappings")
    for stg_id in section:
        if not isinstance(stg_id, str):
            raise UserError(f"{path}: strategy id {stg_id!r} is not a string; quote it (YAML reads an unquoted "
                            f"id such as 010_0 as a number)")
    return section


def _checked_rates(rates: object, layer_names: Sequence[str], where: str) -> dict[str, float]:
    if not isinstance(rates, Mapping):
        raise UserError(f"{where} must map layer names to keep ratios, got {type(rates).__name__}")
    expected = list(layer_names)
    missing, unknown = [n for n in expected if n not in rates], sorted(set(map(str, rates)) - set(expected))
    if missing or unknown:
        raise UserError(f"{where} does not match the model's layers: missing {missing[:4]}, unknown {unknown[:4]}")
    return {name: checked_keep_ratio(rates[name], f"{where} layer {name}") for name in expected}


def _listing(mapping: Mapping) -> str:
    return ", ".join(sorted(map(str, mapping))) or "none"


def _write_atomically(path: Path, document: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a strategy file is meant to be shared
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if _is_json(path):
                json.dump(document, f, indent=2)
                f.write("\n")
            else:
                yaml.safe_dump(document, f, sort_keys=False, default_flow_style=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
