"""The one place that decides which parameters get gradients (the original's prepare_model per exp-mode, README "Experiment modes")."""
import torch.nn as nn

from pruning.layers import MaskedMixin

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def set_trainable(model: nn.Module, *, weights: bool, scores: bool, rates: bool, norm_layers: bool) -> None:
    """weights: conv/linear weight and bias; scores: popup_scores; rates: k_score; norm_layers: BN affine."""
    for module in model.modules():
        if isinstance(module, MaskedMixin):
            module.popup_scores.requires_grad_(scores)
            module.k_score.requires_grad_(rates)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight.requires_grad_(weights)
            if module.bias is not None:
                module.bias.requires_grad_(weights)
        elif isinstance(module, _NORM_TYPES):
            for p in module.parameters(recurse=False):
                p.requires_grad_(norm_layers)
