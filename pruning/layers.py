"""Masked conv and linear layers: frozen-or-trainable weight W, importance scores, and a rate logit.

Parameters keep the original HARP/Hydra names (`popup_scores`, `k_score`) so their checkpoints load.

Speed (ARCHITECTURE.md): the mask and W*M are computed once per optimizer step, not once per forward. They
are cached under the version counters of W, the scores and the rate logit, which every in-place update
(optimizer step, load_state_dict) bumps; the ten attack forwards of a PGD step and the training forward
all reuse them, and a forward adds one autograd node and no arithmetic. Once masks are frozen
(finetune, evaluation) the pruned weights are zeroed in place and the layer runs as a plain conv/linear.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.recipes import MASKS_TOPK
from pruning.masks import channel_top_mask, kept_channel_count, kept_weight_count, top_mask
from pruning.rates import keep_from_logit
from utils.registry import Registry

WEIGHT, CHANNEL = "weight", "channel"
LEARN, FROZEN = "learn", "frozen"


class _StraightThroughMaskedWeight(torch.autograd.Function):
    """W_eff = W * M(scores, k) with HARP's straight-through backward (the original's GetSubnet, github.com/intellisec/harp models/layers.py).

    Forward returns the cached W*M. Backward, with g = dL/dW_eff and gM = g*W summed to the score shape:
    dL/dW = g*M, dL/dscores = gM*sign(scores), dL/dk = sum(gM), passed to the logit r through
    dk/dr = sigmoid'(r)*(1 - k_min).
    """

    @staticmethod
    def forward(ctx, weight, scores, logit, keep_min, mask, masked_weight):
        ctx.save_for_backward(weight, scores, logit, mask)
        ctx.keep_min = keep_min
        return masked_weight.detach()

    @staticmethod
    def backward(ctx, grad):
        weight, scores, logit, mask = ctx.saved_tensors
        grad_weight = grad_scores = grad_logit = None
        if ctx.needs_input_grad[0]:
            grad_weight = grad * mask
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_mask = grad * weight
            if grad_mask.shape != scores.shape:  # channel granularity: sum over the broadcast dims
                dims = [d for d in range(grad_mask.dim()) if scores.shape[d] == 1]
                grad_mask = grad_mask.sum(dim=dims, keepdim=True)
            if ctx.needs_input_grad[1]:
                grad_scores = grad_mask * torch.sign(scores)
            if ctx.needs_input_grad[2]:
                sig = torch.sigmoid(logit)
                grad_logit = grad_mask.sum() * sig * (1 - sig) * (1.0 - ctx.keep_min)
        return grad_weight, grad_scores, grad_logit, None, None, None


class MaskedMixin:
    """State and behaviour shared by MaskedConv2d and MaskedLinear; `_op(x, w)` is the only difference."""

    granularity: str
    keep_min: float
    mask_mode: str

    def _attach_mask(self, granularity: str, keep_min: float) -> None:
        self.granularity = granularity
        self.keep_min = float(keep_min)
        self.mask_mode = LEARN
        in_features = self.weight.shape[1]
        if granularity == WEIGHT:
            shape = self.weight.shape
        else:
            shape = (1, in_features) + (1,) * (self.weight.dim() - 2)
        scores = torch.empty(shape, device=self.weight.device, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(scores, a=math.sqrt(5))  # the original's construction init
        self.popup_scores = nn.Parameter(scores)
        self.k_score = nn.Parameter(torch.tensor(1.0, device=self.weight.device, dtype=self.weight.dtype))
        self._cache_key = None
        self._cache: Optional[Tuple[torch.Tensor, torch.Tensor, int]] = None
        self._grad_hook = None

    # ---- rates and counts
    def keep_rate(self) -> torch.Tensor:
        """The soft keep rate k_l (a 0-dim tensor, differentiable in k_score)."""
        return keep_from_logit(self.k_score, self.keep_min)

    def kept_count(self) -> int:
        """Exact number of weights this layer keeps (integer, as masked)."""
        return self._mask_and_weight()[2]

    def mask(self) -> torch.Tensor:
        """The 0/1 mask broadcastable to the weight."""
        return self._mask_and_weight()[0]

    # ---- the cache (a mask kind overrides `_cache_state`, `_select` and `_straight_through`)
    def _cache_state(self) -> tuple:
        """What the mask and W*M depend on: version counters and storage of W, the scores and the rate logit."""
        return (self.weight._version, self.weight.data_ptr(), self.popup_scores._version,
                self.popup_scores.data_ptr(), self.k_score._version, self.k_score.data_ptr(), self.keep_min,
                self.mask_mode)

    def _select(self) -> Tuple[torch.Tensor, int]:
        """(0/1 mask, kept weight count): the top-|score| entries at the keep rate (runs under no_grad)."""
        keep = float(self.keep_rate())  # one host sync per layer per optimizer step
        if self.granularity == WEIGHT:
            kept = kept_weight_count(keep, self.popup_scores.numel())
            return top_mask(self.popup_scores, kept), kept  # exactly `kept` ones
        channels = self.popup_scores.numel()
        kept_channels = kept_channel_count(keep, channels)
        return channel_top_mask(self.popup_scores, kept_channels), kept_channels * (self.weight.numel() // channels)

    def _mask_and_weight(self) -> Tuple[torch.Tensor, torch.Tensor, int]:
        key = self._cache_state()
        if key != self._cache_key:
            with torch.no_grad():
                mask, kept = self._select()
                masked_weight = self.weight * mask if self.mask_mode == LEARN else self.weight
            self._cache, self._cache_key = (mask, masked_weight, kept), key
        return self._cache

    # ---- forward
    def effective_weight(self) -> torch.Tensor:
        if self.mask_mode == FROZEN:
            if self._grad_hook is None and self.weight.requires_grad:
                # registered here, not in freeze_mask, so it works whichever of freezing and unfreezing comes first
                self._grad_hook = self.weight.register_hook(self._mask_gradient)
            return self.weight
        mask, masked_weight, _ = self._mask_and_weight()
        return self._straight_through(mask, masked_weight)

    def _straight_through(self, mask: torch.Tensor, masked_weight: torch.Tensor) -> torch.Tensor:
        return _StraightThroughMaskedWeight.apply(self.weight, self.popup_scores, self.k_score, self.keep_min,
                                                  mask, masked_weight)

    def forward(self, x):
        return self._op(x, self.effective_weight())

    # ---- freezing
    def freeze_mask(self) -> None:
        """Zero the pruned weights in place and keep them zero: their gradient is masked from now on."""
        self._frozen_mask = self.mask().detach().clone()
        with torch.no_grad():
            self.weight.mul_(self._frozen_mask)
        if self._grad_hook is not None:
            self._grad_hook.remove()
            self._grad_hook = None
        self.mask_mode = FROZEN
        self._cache_key = None

    def _mask_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self._frozen_mask

    def extra_repr(self) -> str:
        return super().extra_repr() + f", granularity={self.granularity}, keep_min={self.keep_min:g}, masks={self.mask_mode}"


class MaskedConv2d(MaskedMixin, nn.Conv2d):
    def _op(self, x, weight):
        return self._conv_forward(x, weight, self.bias)


class MaskedLinear(MaskedMixin, nn.Linear):
    def _op(self, x, weight):
        return F.linear(x, weight, self.bias)


# Mask kinds (a recipe's `mask_kind`): name -> (conv class, linear class); pruning/gates.py adds the in-train gates.
MASK_KINDS = Registry("mask kind")
MASK_KINDS.add(MASKS_TOPK, (MaskedConv2d, MaskedLinear))


def make_masked(module: nn.Module, granularity: str, keep_min: float, kind: str = MASKS_TOPK) -> nn.Module:
    """Turn an nn.Conv2d / nn.Linear into its masked class of `kind` in place (same parameter objects, no copy)."""
    if isinstance(module, MaskedMixin):
        raise ValueError("layer is already masked")
    conv, linear = MASK_KINDS.get(kind)
    module.__class__ = conv if isinstance(module, nn.Conv2d) else linear
    module._attach_mask(granularity, keep_min)
    return module
