"""Per-layer keep-rate strategies (``--stg_id``): the id grammar and the shipped lists.

A strategy id is ``<digits>_<rule>`` or the bare word ``original``:

- ``<digits>`` is the initial global keep ratio written with the first digit as the units digit,
  ``value = int(digits) / 10**(len(digits) - 1)``: ``010`` = 0.10, ``001`` = 0.01, ``0001`` = 0.001,
  ``005`` = 0.05, ``050`` = 0.5, ``100`` = 1.0. At least three digits; the value must lie in (0, 1].
- ``<rule>`` is ``uni`` (every layer at the ratio), ``erk`` (Erdős–Rényi-Kernel, Evci et al. 2020) or
  ``lamp`` (Lee et al. 2021).
- ``original`` keeps every layer dense (1.0); channel pruning starts from it.

The original HARP per-layer lists that cannot be recomputed from the model's shapes alone live in
``strategies/shipped/<arch>.yaml``, keyed by granularity, then id, then module qualified name. Every
other id (``uni``, ``original`` and any density of ``erk``/``lamp``) is computed from the model by
``strategies.allocation.allocate_keep_rates``; ``strategies.start.start_rates`` picks the source for a stage.
The package owns every per-layer rate source: these lists, the rules (``allocation.py``), strategy files with
Heracles' layer-order tables (``files.py``, ``heracles.py``) and the search (``search.py``).

Imports only the standard library, ``yaml`` and ``configs.errors``.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import yaml

from configs.errors import UserError

__all__ = ["RULES", "parse_strategy_id", "shipped_strategy", "shipped_ids"]

RULES = ("uni", "erk", "lamp", "original")

_SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
_ID_RE = re.compile(r"^(?P<digits>[0-9]{3,})_(?P<rule>[a-z]+)$")
_VALID_FORMS = "<digits>_uni|erk|lamp, original or FILE.yaml:ID"


def parse_strategy_id(stg_id: str) -> tuple[float, str]:
    """Split a strategy id into (global keep ratio, rule).

    ``'010_uni'`` -> ``(0.1, 'uni')``; ``'original'`` -> ``(1.0, 'original')``.
    A malformed id raises :class:`UserError` naming the valid forms and the shipped lists.
    """
    if stg_id == "original":
        return 1.0, "original"
    match = _ID_RE.match(stg_id) if isinstance(stg_id, str) else None
    if match is None:
        raise UserError(_bad_id_message(stg_id, "malformed"))
    digits, rule = match.group("digits"), match.group("rule")
    if rule not in RULES or rule == "original":
        raise UserError(_bad_id_message(stg_id, f"rule {rule!r}"))
    value = int(digits) / 10 ** (len(digits) - 1)
    if not 0.0 < value <= 1.0:
        raise UserError(_bad_id_message(stg_id, f"keeps {value:g}"))
    return value, rule


def shipped_strategy(arch: str, granularity: str, stg_id: str) -> dict[str, float] | None:
    """The shipped per-layer keep rates ``{module name: rate}`` for this arch/granularity/id, else None.

    Returns a fresh dict (in the file's layer order) that the caller may modify.
    """
    rates = _load(arch).get(granularity, {}).get(stg_id)
    return None if rates is None else dict(rates)


def shipped_ids(arch: str, granularity: str) -> list[str]:
    """The ids shipped as per-layer lists for this arch and granularity (sorted; empty if none)."""
    return sorted(_load(arch).get(granularity, {}))


def _shipped_archs() -> list[str]:
    return sorted(p.stem for p in _SHIPPED_DIR.glob("*.yaml"))


def _bad_id_message(stg_id: object, why: str) -> str:
    shipped = []
    for arch in _shipped_archs():
        for granularity, ids in sorted(_load(arch).items()):
            shipped.append(f"{arch}/{granularity}: {', '.join(sorted(ids))}")
    listing = "; ".join(shipped) if shipped else "none"
    return f"invalid strategy id {stg_id!r} ({why}): use {_VALID_FORMS}; shipped: {listing}"


@functools.lru_cache(maxsize=None)
def _load(arch: str) -> dict[str, dict[str, dict[str, float]]]:
    """Read and check ``shipped/<arch>.yaml`` once; an arch without a file has no shipped lists."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", arch or ""):
        return {}
    path = _SHIPPED_DIR / f"{arch}.yaml"
    if not path.is_file():
        return {}
    with path.open("r", encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of granularity -> strategy id -> layer -> rate")
    checked: dict[str, dict[str, dict[str, float]]] = {}
    for granularity, ids in data.items():
        if not isinstance(ids, dict):
            raise ValueError(f"{path}: {granularity!r} must map strategy ids to layer rates")
        checked[str(granularity)] = {}
        for stg_id, rates in ids.items():
            if not isinstance(rates, dict) or not rates:
                raise ValueError(f"{path}: {granularity}/{stg_id} must be a non-empty layer -> rate mapping")
            layer_rates = {}
            for name, rate in rates.items():
                rate = float(rate)
                if not (math.isfinite(rate) and 0.0 < rate <= 1.0):
                    raise ValueError(f"{path}: {granularity}/{stg_id}/{name}: rate {rate} not in (0, 1]")
                layer_rates[str(name)] = rate
            checked[str(granularity)][str(stg_id)] = layer_rates
    return checked
