"""The hardware (compression) loss and HARP's dynamic gamma (harp-spec §5), for any architecture.

L_hw = max(a / a_target - 1, 0), where a is differentiable in every layer's soft keep rate k_l:
- weight granularity: a = sum_l n_l k_l / sum_l n_l (parameter-weighted keep), a_target = k;
- channel granularity: a = sum_l F_l kin_l kout_l / sum_l F_l, the soft FLOPs ratio, where F_l are the
  layer's dense FLOPs (measured by pruning.graph), kin_l = k_l and kout_l = the largest input keep rate
  among the layers that consume its output (1 for a network output); a_target is the same ratio with
  every k_l = k (about k^2).
The original instead used hand-written per-architecture FLOP tables and the *next layer in registration
order* as the output rate, which is wrong across ResNet shortcuts (harp-spec §11.1 item 5).
"""
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from pruning.graph import LayerGraph
from pruning.layers import WEIGHT
from pruning.wrap import masked_layers


class CostModel:
    def __init__(self, model: nn.Module, graph: LayerGraph, granularity: str, target_keep: float):
        self.granularity = granularity
        self.names = [name for name, _ in masked_layers(model)]
        missing = [n for n in self.names if n not in graph.layers]
        if missing:
            raise ValueError(f"layers never ran in the inspection pass: {missing}")
        info = [graph.layers[n] for n in self.names]
        index = {n: i for i, n in enumerate(self.names)}
        self.consumers = [[index[c] for c in layer.consumers] for layer in info]
        self.sizes = torch.tensor([layer.weight_count for layer in info], dtype=torch.float64)
        self.flops = torch.tensor([layer.flops for layer in info], dtype=torch.float64)
        self.target = target_keep if granularity == WEIGHT else float(
            self._flops_ratio(torch.full((len(info),), float(target_keep), dtype=torch.float64)))

    def _flops_ratio(self, keep_in: torch.Tensor) -> torch.Tensor:
        ones = keep_in.new_ones(())
        keep_out = torch.stack([keep_in[c].max() if c else ones for c in self.consumers])
        flops = self.flops.to(keep_in)
        return (flops * keep_in * keep_out).sum() / flops.sum()

    def soft_cost(self, model: nn.Module) -> torch.Tensor:
        """The current a (differentiable): keep fraction (weight) or FLOPs ratio (channel)."""
        rates = torch.stack([layer.keep_rate() for _, layer in masked_layers(model)])
        if self.granularity == WEIGHT:
            sizes = self.sizes.to(rates)
            return (sizes * rates).sum() / sizes.sum()
        return self._flops_ratio(rates)

    def loss(self, model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
        """(L_hw, a): the hinge loss and the current soft cost."""
        cost = self.soft_cost(model)
        return torch.clamp(cost / self.target - 1.0, min=0.0), cost

    def exact_flops_ratio(self, model: nn.Module) -> float:
        """FLOPs ratio from the integer kept channel counts (channel granularity) or kept weights (weight)."""
        kept = torch.tensor([layer.kept_count() / layer.weight.numel() for _, layer in masked_layers(model)],
                            dtype=torch.float64)
        if self.granularity == WEIGHT:
            return float((self.flops * kept).sum() / self.flops.sum())
        return float(self._flops_ratio(kept))


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
