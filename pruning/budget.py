"""The hardware (compression) loss and HARP's dynamic gamma (HARP paper Sec. 3; the original's utils/hw.py, github.com/intellisec/harp), for any architecture.

L_hw = max(a / a_target - 1, 0), where a is differentiable in every layer's soft keep rate k_l:
- weight granularity: a = sum_l n_l k_l / sum_l n_l (parameter-weighted keep), a_target = k;
- channel granularity: a = sum_l F_l kin_l kout_l / sum_l F_l, the soft FLOPs ratio, where F_l are the
  layer's dense FLOPs (measured by pruning.graph), kin_l = k_l and kout_l = the largest input keep rate
  among the layers that consume its output (1 for a network output); a_target is the same ratio with
  every k_l = k (about k^2).
The original instead used hand-written per-architecture FLOP tables and the *next layer in registration
order* as the output rate, which is wrong across ResNet shortcuts (a bug of the original code; README, Differences from the original code).
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from pruning.graph import LayerGraph
from pruning.layers import WEIGHT, MaskedMixin
from pruning.rates import keep_from_logit
from pruning.wrap import masked_layers


_BISECTION_STEPS = 40  # halvings of the logit-shift bracket: far below the float32 resolution of a logit


class CostModel:
    """The soft cost a of a masked model and its hinge loss, evaluated once per optimizer step.

    Holds the model's masked layers and every constant on the rates' device, so a step costs one stack of the
    rate logits, a handful of vector ops and (channel) one gather: no module traversal, no host-to-device copy.
    """

    def __init__(self, model: nn.Module, graph: LayerGraph, granularity: str, target_keep: float):
        self.granularity = granularity
        named = masked_layers(model)
        self.names = [name for name, _ in named]
        self.layers = [layer for _, layer in named]
        missing = [n for n in self.names if n not in graph.layers]
        if missing:
            raise ValueError(f"layers never ran in the inspection pass: {missing}")
        info = [graph.layers[n] for n in self.names]
        index = {n: i for i, n in enumerate(self.names)}
        # Index matrix of each layer's consumers into [keep rates..., 0.0, 1.0]: rows are padded with the 0.0
        # slot (neutral for the max); a layer without consumers is a network output and gets the 1.0 slot.
        zero, one = len(info), len(info) + 1
        consumers = [[index[c] for c in layer.consumers] or [one] for layer in info]
        widest = max(len(c) for c in consumers)
        self._consumers = torch.tensor([c + [zero] * (widest - len(c)) for c in consumers])
        weights = [layer.weight_count if granularity == WEIGHT else layer.flops for layer in info]
        self._weights = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        self._keep_min = torch.tensor([layer.keep_min for layer in self.layers], dtype=torch.float64)
        # what a layer's mask counts: weights (weight granularity) or input channels (channel)
        self._units = torch.tensor([layer.popup_scores.numel() for layer in self.layers], dtype=torch.float64)
        self._on_device = {}
        self._from_logits = all(type(layer).keep_rate is MaskedMixin.keep_rate for layer in self.layers)
        # The channel target is the FLOPs ratio of every layer at k, each keeping at least one channel as its mask
        # does (a 1-channel image input is kept whole): what uniform pruning at k costs, so HARP and Hydra compare at
        # equal FLOPs.
        self.target = target_keep if granularity == WEIGHT else float(
            self._flops_ratio(self._at_least_one_unit(torch.full((len(info),), float(target_keep), dtype=torch.float64))))

    def _constants(self, like: torch.Tensor):
        key = (like.device, like.dtype)
        if key not in self._on_device:
            self._on_device[key] = (self._weights.to(like), self._keep_min.to(like), self._consumers.to(like.device),
                                    self._units.to(like))
        return self._on_device[key]

    def _at_least_one_unit(self, rates: torch.Tensor) -> torch.Tensor:
        """Every rate at least one unit of its layer (one weight, or one input channel), as every mask keeps one:
        without it a layer with one input channel (a grey-scale image) would count as prunable while its mask keeps
        it whole, and the cost would undercount what the masks keep."""
        return torch.maximum(rates, 1.0 / self._constants(rates)[3])

    def _flops_ratio(self, keep_in: torch.Tensor) -> torch.Tensor:
        weights, _, consumers, _ = self._constants(keep_in)
        keep_out = torch.cat([keep_in, keep_in.new_tensor([0.0, 1.0])])[consumers].amax(dim=1)
        return (weights * keep_in * keep_out).sum()

    def layer_rates(self) -> torch.Tensor:
        """Every layer's differentiable keep rate k_l (at least one unit, `_at_least_one_unit`), in layer order.
        HARP's rates all come from rate logits, so they are one vectorised stack; another mask kind (in-train gates)
        gives each layer's own `keep_rate()`."""
        if not self._from_logits:
            return torch.stack([layer.keep_rate() for layer in self.layers])
        return self._rates_from_logits(torch.stack([layer.k_score for layer in self.layers]))

    def _rates_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self._at_least_one_unit(keep_from_logit(logits, self._constants(logits)[1]))

    def cost_of(self, rates: torch.Tensor) -> torch.Tensor:
        """a for given per-layer keep rates: keep fraction (weight) or FLOPs ratio (channel)."""
        if self.granularity == WEIGHT:
            return (self._constants(rates)[0] * rates).sum()
        return self._flops_ratio(rates)

    def soft_cost(self) -> torch.Tensor:
        """The current a (differentiable in every layer's rate): keep fraction (weight) or FLOPs ratio (channel)."""
        return self.cost_of(self.layer_rates())

    def loss(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(L_hw, a): the hinge loss and the current soft cost."""
        cost = self.soft_cost()
        return torch.clamp(cost / self.target - 1.0, min=0.0), cost

    def raise_to_target(self) -> Optional[float]:
        """The projection onto a >= a_target (`--target-floor`): when the cost has fallen below the target, move the
        rate logits r along the gradient g of the cost with respect to them (the hardware loss's own direction),
        r + c * g, by the c > 0 that brings the cost back onto the target. That is the smallest move of the logits
        that does it (to first order), so it undoes exactly the part of a step that pushed a under the target and
        leaves the part that moved rates between layers at the same cost. Returns c, or None when the cost is not
        below the target (or no rate can move it: every layer at its one unit).

        Every entry of g is positive and a(r + c * g) grows monotonically with c, so c is found by bisection; it
        takes the bracket's upper end, so a ends at or just above the target."""
        if not self._from_logits:
            raise ValueError("raise_to_target needs HARP's rate logits")
        with torch.no_grad():
            if float(self.soft_cost()) >= self.target:
                return None
        unique = {id(layer.k_score): layer.k_score for layer in self.layers}  # tied rates move once
        index = {key: i for i, key in enumerate(unique)}
        position = torch.tensor([index[id(layer.k_score)] for layer in self.layers])
        with torch.enable_grad():
            logits = torch.stack([p.detach() for p in unique.values()]).double().requires_grad_(True)
            position = position.to(logits.device)
            direction, = torch.autograd.grad(self.cost_of(self._rates_from_logits(logits[position])), logits)
        logits, dtype = logits.detach(), next(iter(unique.values())).dtype
        if not float(direction.norm()) > 0:
            return None

        def cost_at(shift: float) -> float:  # the logits as they will be stored (rounded to their dtype)
            moved = (logits + shift * direction).to(dtype).double()
            return float(self.cost_of(self._rates_from_logits(moved[position])))

        low, high = 0.0, 1.0 / float(direction.norm())  # a move of length 1 (in logits) to start the bracket
        while cost_at(high) < self.target:  # every rate tends to 1 (a to 1 >= target) as the shift grows
            low, high = high, 2.0 * high
        for _ in range(_BISECTION_STEPS):
            middle = 0.5 * (low + high)
            low, high = (middle, high) if cost_at(middle) < self.target else (low, middle)
        with torch.no_grad():
            for logit, moved in zip(unique.values(), logits + high * direction):
                logit.copy_(moved)
        return high

    def hard_cost(self) -> float:
        """The cost the masks really have: each layer's exact kept fraction (integer counts; for channel masks the
        kept input channels) in place of its soft rate, so a = the exact global keep fraction (weight) or the
        FLOPs ratio of the kept channels (channel)."""
        with torch.no_grad():
            rates = torch.tensor([layer.kept_count() / layer.weight.numel() for layer in self.layers],
                                 dtype=torch.float64)
            return float(self.cost_of(rates))

    def budget(self) -> Dict[str, Any]:
        """Where the masked model stands against its target: what is measured, the target, the reached value,
        and whether it is on target (`on_target`)."""
        return budget_record(self.granularity, self.target, self.hard_cost())


TARGET_TOLERANCE = 0.10  # relative: a pruned model is on target when its reached cost is within 10 % of the target


def on_target(reached: float, target: float, tolerance: float = TARGET_TOLERANCE) -> bool:
    return abs(reached / target - 1.0) <= tolerance


def budget_record(granularity: str, target: float, reached: float) -> Dict[str, Any]:
    """The budget entry of metrics, checkpoints and results: `measure` is the keep fraction of the prunable weights
    (weight granularity) or the FLOPs ratio of the kept channels (channel), `target` what --k asks for in it."""
    return {"measure": "keep" if granularity == WEIGHT else "flops", "target": float(target),
            "reached": float(reached), "on_target": on_target(reached, target)}


def describe_budget(budget: Dict[str, Any]) -> str:
    """'kept 0.2532 % of the weights against the target 1 %' / 'FLOPs ratio ...' for messages."""
    what = "kept" if budget["measure"] == "keep" else "FLOPs ratio"
    tail = " of the weights" if budget["measure"] == "keep" else ""
    return f"{what} {100 * budget['reached']:.4g} %{tail} against the target {100 * budget['target']:.4g} %"


def summarize_budgets(budgets: Sequence[Dict[str, Any]]) -> str:
    """'kept 0.25, 0.3 % vs 1 %' / 'FLOPs 3 % vs 6.27 %': several runs' reached values against their (shared)
    target, short enough for a table cell."""
    what = "kept" if budgets[0]["measure"] == "keep" else "FLOPs"
    reached = ", ".join(f"{100 * b['reached']:.3g}" for b in budgets)
    return f"{what} {reached} % vs {100 * budgets[0]['target']:.3g} %"


class GammaSchedule:
    """HARP's dynamic gamma, the hardware loss's weight: gamma_e = (e + 1) * gamma0 until the end-of-epoch
    hardware loss rounds to 0 (4 d.p.), then frozen for good, as the original.

    It is the prune stage's `dynamic_gamma` hook: before each epoch it sets the weight of the regularizer it was
    given. Whether an epoch's checkpoint may become "best" is decided from that epoch's own budget instead
    (train.py; `target_met`, `on_target`).
    """

    state_key = "gamma"

    def __init__(self, gamma0: float, dynamic: bool = True, frozen: Optional[float] = None, regularizer=None):
        self.gamma0, self.dynamic, self.frozen = gamma0, dynamic, frozen
        self.regularizer = regularizer

    def value(self, epoch: int) -> float:
        if self.frozen is not None:
            return self.frozen
        return (epoch + 1) * self.gamma0 if self.dynamic else self.gamma0

    def end_of_epoch(self, epoch: int, hw_loss: float) -> None:
        if self.frozen is None and target_met(hw_loss):
            self.frozen = self.value(epoch)

    def before_epoch(self, epoch: int) -> Dict[str, Any]:
        self.regularizer.weight = self.value(epoch)
        return {"gamma": self.regularizer.weight}

    def after_epoch(self, epoch: int, record: Dict[str, Any]) -> None:
        self.end_of_epoch(epoch, record["hw_loss"])

    def state_dict(self) -> Dict:
        return {"gamma0": self.gamma0, "dynamic": self.dynamic, "frozen": self.frozen}

    def load_state_dict(self, state: Dict) -> None:
        self.gamma0, self.dynamic, self.frozen = state["gamma0"], state["dynamic"], state["frozen"]


def target_met(hw_loss: float) -> bool:
    return round(float(hw_loss), 4) == 0
