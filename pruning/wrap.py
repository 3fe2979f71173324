"""Swapping a dense model's conv/linear layers for masked ones, freezing masks, sparsity and dense export."""
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from configs.recipes import MASKS_TOPK
from pruning.layers import MaskedMixin, make_masked

SCORE_KEY, RATE_KEY = "popup_scores", "k_score"


def prunable_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Every conv and linear layer in registration order (HARP prunes all of them: the original code's SubnetConv/SubnetLinear replace every one)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def masked_layers(model: nn.Module) -> List[Tuple[str, MaskedMixin]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MaskedMixin)]


def sparsify(model: nn.Module, granularity: str, keep_min: float, kind: str = MASKS_TOPK) -> List[str]:
    """Make every conv/linear layer masked (mask kind `kind`, pruning.layers.MASK_KINDS), in place; returns their
    names."""
    names = []
    for name, module in prunable_layers(model):
        make_masked(module, granularity, keep_min, kind)
        names.append(name)
    return names


def freeze_masks(model: nn.Module) -> None:
    """Fix every mask (finetune modes, evaluation): pruned weights become exact zeros that stay zero."""
    for _, layer in masked_layers(model):
        layer.freeze_mask()


def model_sparsity(model: nn.Module) -> Dict:
    """Exact integer kept/total counts of the prunable (conv and linear) weights, of any model.

    A masked model reports its masks (`sparsity_report`). A plain model, e.g. a dense export with the masks folded
    in, reports its non-zero weights; then 'rate' equals 'keep'. 'counted' says which; 'sparsity' = 1 - global_keep.
    """
    if masked_layers(model):
        report = sparsity_report(model)
        report["counted"] = "masks"
    else:
        per_layer, kept_total, total = {}, 0, 0
        for name, layer in prunable_layers(model):
            kept, n = int(torch.count_nonzero(layer.weight.detach())), layer.weight.numel()
            per_layer[name] = {"kept": kept, "total": n, "keep": kept / n, "rate": kept / n}
            kept_total += kept
            total += n
        report = {"global_keep": kept_total / total if total else 1.0, "kept": kept_total, "total": total,
                  "per_layer": per_layer, "counted": "non-zero weights"}
    report["sparsity"] = 1.0 - report["global_keep"]
    return report


def sparsity_report(model: nn.Module) -> Dict:
    """Exact kept/total weight counts per masked layer and globally, plus each layer's soft rate k_l."""
    per_layer, kept_total, total = {}, 0, 0
    for name, layer in masked_layers(model):
        kept, n = layer.kept_count(), layer.weight.numel()
        per_layer[name] = {"kept": kept, "total": n, "keep": kept / n, "rate": float(layer.keep_rate().detach())}
        kept_total += kept
        total += n
    return {"global_keep": kept_total / total if total else 1.0, "kept": kept_total, "total": total,
            "per_layer": per_layer}


def dense_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict with each layer's own learned mask folded into its weight and no score/rate keys.

    It loads with strict=True into the same architecture built from plain nn.Conv2d/nn.Linear (for
    vgg16_bn and resnet18: the AP benchmark's base models) and gives the same logits.
    """
    state = {}
    masked = dict(masked_layers(model))
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if leaf in (SCORE_KEY, RATE_KEY) and owner in masked:
            continue
        if leaf == "weight" and owner in masked:
            value = value * masked[owner].mask().to(value.dtype)
        state[key] = value.detach().clone()
    return state
