"""A stage's per-layer start rates for ``--stg_id``: the one place that picks the rate source.

- ``FILE:ID`` (a ``.json``/``.yaml`` strategy file): that strategy (:mod:`strategies.files`);
- an id with a per-layer list of the original HARP code for this architecture and granularity: the shipped list
  (:func:`strategies.shipped_strategy`);
- any other id (``<density>_<rule>``, ``original``): the rule computed from the model's layers
  (:func:`strategies.allocation.allocate_keep_rates`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from strategies import parse_strategy_id, shipped_strategy
from strategies.allocation import allocate_keep_rates
from strategies.files import load_strategy, split_file_strategy

__all__ = ["start_rates"]


def start_rates(stg_id: str, *, arch: str, granularity: str, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``{layer name: keep rate}`` for the prunable layers whose weights are ``weights`` (in registration order).

    Bad input (a malformed id, a missing file or strategy, a strategy for other layers) raises a one-line
    :class:`configs.errors.UserError`.
    """
    if split_file_strategy(stg_id) is not None:
        return load_strategy(stg_id, arch=arch, granularity=granularity, layer_names=list(weights)).rates
    density, rule = parse_strategy_id(stg_id)
    shipped = shipped_strategy(arch, granularity, stg_id)
    if shipped is not None:
        return shipped
    return allocate_keep_rates(rule, density, weights)
