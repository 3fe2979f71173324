"""In-train pruning's trainable gates (Vemparala et al., CVPR 2021 workshop SAIAD).

Every prunable weight (weight granularity) or input channel (channel granularity) has a trainable gate logit m.
The binary mask is M = round(0.5 * tanh(m) + 0.5), i.e. tanh, scale, shift and round to {0, 1} (M = 1 iff m > 0),
and the round's zero gradient is replaced by the straight-through estimator: dM/dm := 0.5 * (1 - tanh(m)^2), the
slope of the soft gate 0.5 * tanh(m) + 0.5. The gate logits are ordinary parameters, so the run's weight decay
pulls them towards 0, where they flip easily ("regularised together with the weights so they keep moving").

Reconstruction choices (the seed states none of these; no public code exists):
- the logits start at GATE_INIT = 0.05: every gate open (training starts dense, from random weights), near
  enough to 0 that the budget loss closes gates within a few epochs;
- every layer keeps at least k_min = alpha * k of its gates (at least one; channel: as HARP's channel count), the
  gates with the largest logits, so no layer is ever cut off entirely;
- a layer's keep rate (`keep_rate`) is its exact kept fraction, with the gradient of its mean soft gate
  (straight-through), so HARP's hinge max(a / a_target - 1, 0) (pruning.budget.CostModel) acts on the real
  parameter count / FLOPs ratio a, weighted by gamma with HARP's dynamic schedule (trainers/regularizers.py);
- `project_to_target` is the hard projection onto the budget, run before each epoch of the last
  --gate-settle-epochs, after which the gates are frozen: the open gates become those of largest logit that fit
  the budget. Gates that feel the same budget gradient close together, so the budget loss can overshoot far
  below the target (on digits, 100 % -> 0.7 % kept in one epoch at k = 0.01); the projection then reopens the
  best closed gates;
- an epoch meets the target (and may become the best checkpoint) when its hard cost is on budget: at most the
  target and less than BUDGET_TOLERANCE below it (`on_budget`).

The layers keep HARP's checkpoint layout: the logits are stored as `popup_scores`, and `k_score` is a buffer that
holds the layer's kept fraction as HARP's rate logit (derived from the gates at every mask refresh, never
trained), so the loaders, test.py, dense export and sparsity reports treat a gate model as any pruned model.
Speed as HARP's layers (ARCHITECTURE.md): the mask is refreshed once per optimizer step, frozen masks run as plain
layers.
"""
import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from configs.recipes import MASKS_GATES
from pruning.budget import CostModel, target_met
from pruning.init import share_parameter
from pruning.layers import CHANNEL, MASK_KINDS, MaskedConv2d, MaskedLinear, MaskedMixin
from pruning.masks import kept_channel_count, kept_weight_count
from pruning.rates import logit_from_keep
from pruning.wrap import masked_layers

log = logging.getLogger(__name__)

GATE_INIT = 0.05  # start logit of every gate: open, close enough to 0 that the budget loss can close it
BUDGET_TOLERANCE = 0.05  # an in-train epoch is on budget when its hard cost is in [(1 - this) * target, target]


def soft_gate(logits: torch.Tensor) -> torch.Tensor:
    """0.5 * tanh(m) + 0.5 in (0, 1); the binary mask is its rounding."""
    return 0.5 * torch.tanh(logits) + 0.5


def gate_slope(logits: torch.Tensor) -> torch.Tensor:
    """d soft_gate / dm = 0.5 * (1 - tanh(m)^2): the straight-through gradient of the rounded gate."""
    t = torch.tanh(logits)
    return 0.5 * (1.0 - t * t)


class _StraightThroughGate(torch.autograd.Function):
    """W_eff = W * M(m). Backward with g = dL/dW_eff: dL/dW = g * M, dL/dm = (g * W summed to m's shape) * slope(m)."""

    @staticmethod
    def forward(ctx, weight, logits, mask, masked_weight):
        ctx.save_for_backward(weight, logits, mask)
        return masked_weight.detach()

    @staticmethod
    def backward(ctx, grad):
        weight, logits, mask = ctx.saved_tensors
        grad_weight = grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_weight = grad * mask
        if ctx.needs_input_grad[1]:
            grad_mask = grad * weight
            if grad_mask.shape != logits.shape:  # channel granularity: sum over the broadcast dims
                dims = [d for d in range(grad_mask.dim()) if logits.shape[d] == 1]
                grad_mask = grad_mask.sum(dim=dims, keepdim=True)
            grad_logits = grad_mask * gate_slope(logits)
        return grad_weight, grad_logits, None, None


class GateMixin(MaskedMixin):
    """A masked layer whose mask is its own gates (m > 0), not the top-k scores at a rate."""

    def _attach_mask(self, granularity: str, keep_min: float) -> None:
        super()._attach_mask(granularity, keep_min)
        with torch.no_grad():
            self.popup_scores.fill_(GATE_INIT)
        del self.k_score  # HARP's trainable rate logit; here a buffer derived from the gates
        self.register_buffer("k_score", torch.zeros((), device=self.weight.device, dtype=self.weight.dtype))

    def floor_units(self) -> int:
        """The fewest gates the layer keeps: k_min of them, and at least one."""
        units = self.popup_scores.numel()
        if self.granularity == CHANNEL:
            return kept_channel_count(self.keep_min, units)
        return max(1, kept_weight_count(self.keep_min, units))

    def open_gates(self, threshold: float = 0.0) -> Tuple[torch.Tensor, int]:
        """(boolean mask of the gates kept, their number) when every logit above `threshold` is open, topped up to
        `floor_units` with the largest logits."""
        logits = self.popup_scores.detach()
        kept = logits > threshold
        count = int(kept.sum())  # one host sync per layer per refresh
        floor = self.floor_units()
        if count >= floor:
            return kept, count
        top = torch.zeros(logits.numel(), dtype=torch.bool, device=logits.device)
        top[torch.topk(logits.flatten(), floor, sorted=False).indices] = True
        return top.view_as(logits), floor

    # ---- MaskedMixin's mask-kind hooks
    def _cache_state(self) -> tuple:
        return (self.weight._version, self.weight.data_ptr(), self.popup_scores._version,
                self.popup_scores.data_ptr(), self.keep_min, self.mask_mode)

    def _select(self) -> Tuple[torch.Tensor, int]:
        kept_gates, count = self.open_gates()
        kept = count * (self.weight.numel() // self.popup_scores.numel())
        self.k_score.fill_(logit_from_keep(kept / self.weight.numel(), self.keep_min))
        return kept_gates.to(self.popup_scores.dtype), kept

    def _straight_through(self, mask: torch.Tensor, masked_weight: torch.Tensor) -> torch.Tensor:
        return _StraightThroughGate.apply(self.weight, self.popup_scores, mask, masked_weight)

    def keep_rate(self) -> torch.Tensor:
        """The exact kept fraction (0-dim), with the gradient of the mean soft gate (straight-through)."""
        kept = self._mask_and_weight()[2]
        soft = soft_gate(self.popup_scores).mean()
        return soft - soft.detach() + kept / self.weight.numel()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", gates"


class GateConv2d(GateMixin, MaskedConv2d):
    pass


class GateLinear(GateMixin, MaskedLinear):
    pass


MASK_KINDS.add(MASKS_GATES, (GateConv2d, GateLinear))


# ----------------------------------------------------------------------------------------------- model-level
def gate_layers(model: nn.Module) -> List[Tuple[str, GateMixin]]:
    return [(name, layer) for name, layer in masked_layers(model) if isinstance(layer, GateMixin)]


def unique_gates(layers) -> List[nn.Parameter]:
    """The distinct gate-logit parameters of `layers` (tied layers share one)."""
    seen: Dict[int, nn.Parameter] = {}
    for layer in layers:
        seen.setdefault(id(layer.popup_scores), layer.popup_scores)
    return list(seen.values())


def tie_gates(model: nn.Module, groups: List[List[str]]) -> Dict[str, str]:
    """Make the layers of each group share the first one's channel gates (one Parameter), so layers that read the
    same tensor (a block's conv1 and its shortcut) keep the same channels of it. Returns {follower: owner}."""
    return share_parameter(dict(gate_layers(model)), groups, "popup_scores")


def set_gates_trainable(layers, trainable: bool) -> None:
    """Switch the gate logits of `layers` (gate layers) on or off for training; the weights are not touched."""
    for gates in unique_gates(layers):
        gates.requires_grad_(trainable)


def on_budget(cost: float, target: float) -> bool:
    """The gates meet the budget: the hard cost is at most the target (to 4 decimals of the hinge, as HARP's
    `target_met`) and at most BUDGET_TOLERANCE below it. Gates that move together can overshoot far below the
    budget; such an epoch is not yet the pruned model the budget asks for (the projection fills the budget)."""
    return target_met(max(cost / target - 1.0, 0.0)) and cost >= (1.0 - BUDGET_TOLERANCE) * target


def _hard_cost(cost_model: CostModel, threshold: float) -> float:
    rates = [layer.open_gates(threshold)[1] / layer.popup_scores.numel() for layer in cost_model.layers]
    return float(cost_model.cost_of(torch.tensor(rates, dtype=torch.float64)))


def project_to_target(cost_model: CostModel) -> Optional[float]:
    """The hard projection onto the budget: the open gates become those of largest logit that fit it. Finds the
    smallest threshold tau (one of the logits) at which the hard cost a (gates above tau open, each layer's floor
    kept) is at most the target, and shifts every logit by -tau, so exactly those gates stay open: it closes gates
    when a is over the target and reopens the best closed ones when a has fallen below it. Returns tau, or None when
    the open gates are already those.

    The cost falls monotonically with tau, so tau is found by bisection over the sorted distinct logits; if even
    the floors exceed the target, the largest logit is used (only the floors stay open) and a warning logged.
    """
    target = cost_model.target
    params = unique_gates(cost_model.layers)
    with torch.no_grad():
        values = torch.unique(torch.cat([p.detach().flatten().double() for p in params])).cpu()
        low, high = 0, values.numel() - 1
        if _hard_cost(cost_model, float(values[high])) > target:
            log.warning("the per-layer floors (k_min = alpha * k) alone exceed the target %.6f", target)
            low = high
        while low < high:  # invariant: the cost at values[high] meets the target
            middle = (low + high) // 2
            if _hard_cost(cost_model, float(values[middle])) <= target:
                high = middle
            else:
                low = middle + 1
        tau = float(values[high])
        # the open gates are already those above tau when no logit lies between tau and 0
        if not bool(((values > min(tau, 0.0)) & (values <= max(tau, 0.0))).any()):
            return None
        for p in params:
            p.sub_(tau)
    return tau
