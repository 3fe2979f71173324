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
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from pruning.graph import LayerGraph
from pruning.layers import WEIGHT, MaskedMixin
from pruning.rates import keep_from_logit
from pruning.wrap import masked_layers


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
        self._on_device = {}
        self._from_logits = all(type(layer).keep_rate is MaskedMixin.keep_rate for layer in self.layers)
        self.target = target_keep if granularity == WEIGHT else float(
            self._flops_ratio(torch.full((len(info),), float(target_keep), dtype=torch.float64)))

    def _constants(self, like: torch.Tensor):
        key = (like.device, like.dtype)
        if key not in self._on_device:
            self._on_device[key] = (self._weights.to(like), self._keep_min.to(like), self._consumers.to(like.device))
        return self._on_device[key]

    def _flops_ratio(self, keep_in: torch.Tensor) -> torch.Tensor:
        weights, _, consumers = self._constants(keep_in)
        keep_out = torch.cat([keep_in, keep_in.new_tensor([0.0, 1.0])])[consumers].amax(dim=1)
        return (weights * keep_in * keep_out).sum()

    def layer_rates(self) -> torch.Tensor:
        """Every layer's differentiable keep rate k_l, in layer order. HARP's rates all come from rate logits, so
        they are one vectorised stack; another mask kind (in-train gates) gives each layer's own `keep_rate()`."""
        if not self._from_logits:
            return torch.stack([layer.keep_rate() for layer in self.layers])
        logits = torch.stack([layer.k_score for layer in self.layers])
        _, keep_min, _ = self._constants(logits)
        return keep_from_logit(logits, keep_min)

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


@dataclass
class GammaSchedule:
    """gamma_e = (e + 1) * gamma0 until the end-of-epoch hardware loss rounds to 0 (4 d.p.), then frozen.

    Frozen for good once reached, as the original; whether an epoch's checkpoint may become "best" is
    decided from that epoch's own hardware loss instead (see `target_met`).
    """

    gamma0: float
    dynamic: bool = True
    frozen: Optional[float] = None

    def value(self, epoch: int) -> float:
        if self.frozen is not None:
            return self.frozen
        return (epoch + 1) * self.gamma0 if self.dynamic else self.gamma0

    def end_of_epoch(self, epoch: int, hw_loss: float) -> None:
        if self.frozen is None and target_met(hw_loss):
            self.frozen = self.value(epoch)

    def state_dict(self) -> Dict:
        return asdict(self)

    def load_state_dict(self, state: Dict) -> None:
        self.gamma0, self.dynamic, self.frozen = state["gamma0"], state["dynamic"], state["frozen"]


def target_met(hw_loss: float) -> bool:
    return round(float(hw_loss), 4) == 0
