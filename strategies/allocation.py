"""Per-layer keep rates for a global density: uniform, ERK and LAMP allocation.

``allocate_keep_rates(rule, density, weights)`` turns a global keep ratio into one keep rate per layer, by one of
the rules ``strategies.RULES`` names (the id grammar's; this module implements them and imports nothing of the
toolkit).
It knows no architecture: it sees only ``{layer name: weight tensor}``, so it serves any model. The
result initialises HARP's per-layer rates (``--stg_id``, e.g. ``005_erk``); the rules are

- ``original``: every layer 1.0 (dense start, used for channel pruning);
- ``uni``: every layer at ``density``;
- ``erk``: Erdős–Rényi-Kernel (Evci et al. 2020, "Rigging the Lottery"): rate proportional to
  (sum of the weight's dims) / (product of the weight's dims), layers that would exceed 1 capped at 1;
- ``lamp``: layer-adaptive magnitude pruning scores (Lee et al. 2021), kept globally by score.

For every rule but ``original`` the parameter-weighted global density ``sum n_l*k_l / sum n_l`` equals
``density`` up to floating-point rounding (the one exception is documented in ``_lamp``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping

import torch

__all__ = ["allocate_keep_rates"]


def allocate_keep_rates(rule: str, density: float, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Keep rate in (0, 1] per layer, keyed and ordered like ``weights``.

    ``weights`` maps layer names to their weight tensors. ``erk``, ``uni`` and ``original`` read only the
    shapes (expanded or meta tensors are fine); ``lamp`` reads the values. Raises ``ValueError`` for an
    unknown rule, a density outside (0, 1], no layers, an empty weight or non-finite LAMP weights.
    """
    density = float(density)
    if not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not weights:
        raise ValueError("no layers to allocate keep rates to")
    for name, w in weights.items():
        if w.numel() == 0:
            raise ValueError(f"layer {name!r} has an empty weight")
    if rule == "original":
        return {name: 1.0 for name in weights}
    if rule == "uni":
        return {name: density for name in weights}
    if rule == "erk":
        return _erk(density, {name: tuple(w.shape) for name, w in weights.items()})
    if rule == "lamp":
        return _lamp(density, weights)
    raise ValueError(f"unknown allocation rule {rule!r}; the rules are strategies.RULES")


def _erk(density: float, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, float]:
    """ERK with kernel dims: k_l = min(1, eps * sum(shape_l) / prod(shape_l)), eps solving the budget.

    Layers whose rate would exceed 1 are fixed at exactly 1 and eps is re-solved for the rest, until no
    new layer is capped. Reproduces the original HARP vgg16_bn/resnet18 ``010_erk`` lists to ~1e-5.
    """
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    budget = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        free = [name for name in shapes if name not in dense]
        if not free:  # only reachable at density 1: everything is dense
            return {name: 1.0 for name in shapes}
        remaining = budget - sum(sizes[name] for name in dense)
        eps = remaining / sum(sizes[name] * raw[name] for name in free)
        newly = {name for name in free if eps * raw[name] > 1.0}
        if not newly:
            break
        dense |= newly
    return {name: 1.0 if name in dense else min(1.0, eps * raw[name]) for name in shapes}


def _lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """One layer's LAMP scores, sorted ascending (float32, on the weight's device).

    With the squared magnitudes sorted ascending, the score at position u is
    ``w_u^2 / sum_{v >= u} w_v^2``; it is non-decreasing along that order, so the result stays sorted.
    A zero suffix sum (all remaining weights zero) gives score 0. Computed in float64 per layer, stored
    in float32 to halve the memory held across layers (~100 MB for ResNet50's 25.5M weights).
    """
    sq = w.detach().reshape(-1).to(torch.float64).square()
    if not torch.isfinite(sq).all():
        raise ValueError("LAMP needs finite weights")
    sq, _ = torch.sort(sq)
    suffix = sq.flip(0).cumsum(0).flip(0)
    scores = torch.where(suffix > 0, sq / suffix.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(sq))
    # Rounding in the suffix sum can break monotonicity by an ulp; restore it so searchsorted is valid.
    scores = torch.cummax(scores, 0).values
    return scores.to(torch.float32)


def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _f32_from_bits(b: int) -> float:
    return struct.unpack("<f", struct.pack("<i", b))[0]


def _lamp(density: float, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """LAMP allocation: keep the globally highest LAMP scores, read off each layer's kept fraction.

    With N weights in total, the floor(density*N) highest scores are kept (ties at the threshold go to
    the earlier layers in ``weights`` order). The fractional remainder density*N - floor(density*N)
    (< 1 weight) is added to the layer owning the best-scored weight not kept, so that
    sum n_l*k_l = density*N exactly; the mask's own rounding later turns rates into integer counts.

    Every layer keeps at least one weight: a layer left with none (only possible when its weights are
    all zero, since every layer's largest weight scores 1, or when fewer weights are kept than there
    are layers) gets one, and the kept weight with the globally lowest score in a layer that keeps two
    or more is dropped instead, so the total is unchanged. If fewer than one weight per layer would be
    kept in total, every layer keeps exactly one and the global density exceeds ``density``.
    """
    names = list(weights)
    scores = [_lamp_scores(weights[name]) for name in names]
    sizes = [s.numel() for s in scores]
    total = sum(sizes)
    target = density * total
    keep_total = min(total, math.floor(target + 1e-9 * target))  # tolerate density*N landing just below an integer
    frac = max(0.0, target - keep_total)

    if keep_total < len(names):  # cannot give every layer a weight and still meet the budget
        return {name: 1.0 / n for name, n in zip(names, sizes)}

    def count_at_least(t: float, side: str) -> list[int]:
        probe = torch.tensor([t], dtype=torch.float32)
        return [n - int(torch.searchsorted(s, probe.to(s.device), side=side)) for s, n in zip(scores, sizes)]

    # Scores lie in [0, 1]; non-negative float32 values order like their bit patterns, so bisecting on
    # the bits finds the exact keep_total-th largest score without concatenating or sorting all scores.
    lo, hi = 0, _f32_bits(1.0) + 1  # count(score >= lo) >= keep_total > count(score >= hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sum(count_at_least(_f32_from_bits(mid), "left")) >= keep_total:
            lo = mid
        else:
            hi = mid
    threshold = _f32_from_bits(lo)
    kept = count_at_least(threshold, "right")  # strictly above the threshold
    at_threshold = [ge - gt for ge, gt in zip(count_at_least(threshold, "left"), kept)]
    short = keep_total - sum(kept)
    for i, ties in enumerate(at_threshold):
        take = min(short, ties)
        kept[i] += take
        short -= take

    def lowest_kept(i: int) -> float:
        return float(scores[i][sizes[i] - kept[i]])

    for i in range(len(names)):
        if kept[i] == 0:
            donors = [j for j in range(len(names)) if kept[j] >= 2]
            donor = min(donors, key=lowest_kept)  # exists because keep_total >= number of layers
            kept[donor] -= 1
            kept[i] = 1

    if frac > 0.0:
        open_layers = [i for i in range(len(names)) if kept[i] < sizes[i]]
        if open_layers:
            best = max(open_layers, key=lambda i: (float(scores[i][sizes[i] - kept[i] - 1]), -i))
            rates = [k / n for k, n in zip(kept, sizes)]
            rates[best] = (kept[best] + frac) / sizes[best]
            return dict(zip(names, rates))
    return {name: k / n for name, k, n in zip(names, kept, sizes)}
