"""Initialising scores and rate logits, and tying rates of layers that share an input (the original HARP code's scaled score init, initialize_stg_rate and map_shortcut_rate)."""
import math
from typing import Dict, List, Mapping

import torch
import torch.nn as nn

from configs.errors import UserError
from pruning.layers import WEIGHT
from pruning.rates import logit_from_keep
from pruning.wrap import masked_layers
from utils.registry import Registry

# Score initialisations a recipe can name (`Recipe.score_init`): name -> fn(model). A plug-in adds its own.
SCORE_INITS = Registry("score initialisation")


def init_scores_from_weights(model: nn.Module) -> None:
    """HARP/Hydra's scaled init, so pruning starts as layer-wise magnitude pruning.

    weight: s = sqrt(6 / fan_in) * W / max|W|, fan_in = C_in * kh * kw (sign of W kept).
    channel: s_c = sqrt(6) * m_c / max(m), m_c = L1 norm of input channel c's weights. The original took
    row norms of a memory-order reshape, which mixes output filters; we use
    true per-input-channel norms and keep its sqrt(6) scale.
    """
    with torch.no_grad():
        for _, layer in masked_layers(model):
            weight = layer.weight
            if layer.granularity == WEIGHT:
                fan_in = weight[0].numel()
                scores = math.sqrt(6.0 / fan_in) * weight / weight.abs().max().clamp_min(1e-12)
            else:
                dims = [d for d in range(weight.dim()) if d != 1]
                norms = weight.abs().sum(dim=dims)
                scores = (math.sqrt(6.0) * norms / norms.max().clamp_min(1e-12)).view_as(layer.popup_scores)
            layer.popup_scores.copy_(scores)


def init_scores_random(model: nn.Module, kind: str) -> None:
    init = {"kaiming_normal": nn.init.kaiming_normal_, "kaiming_uniform": nn.init.kaiming_uniform_,
            "xavier_normal": nn.init.xavier_normal_, "xavier_uniform": nn.init.xavier_uniform_}[kind]
    with torch.no_grad():
        for _, layer in masked_layers(model):
            init(layer.popup_scores)


def set_keep_rates(model: nn.Module, rates: Mapping[str, float]) -> List[str]:
    """Set every layer's rate logit so its keep rate is `rates[name]`; returns names whose rate was raised
    to the lower bound k_min. Names must match the masked layers exactly."""
    layers = dict(masked_layers(model))
    missing, extra = sorted(set(layers) - set(rates)), sorted(set(rates) - set(layers))
    if missing or extra:
        raise UserError(f"strategy does not match the model's layers: missing {missing[:5]}, unknown {extra[:5]}")
    raised = []
    with torch.no_grad():
        for name, layer in layers.items():
            if rates[name] <= layer.keep_min:
                raised.append(name)
            layer.k_score.fill_(logit_from_keep(float(rates[name]), layer.keep_min))
    return raised


def tie_rates(model: nn.Module, groups: List[List[str]]) -> Dict[str, str]:
    """Make the layers of each group share the first one's rate logit (one Parameter object).

    Under channel granularity a block's conv1 and its shortcut read the same tensor, so they must keep
    the same number of its channels. The original copied conv1's rate to the frozen shortcut after every
    step; sharing the parameter keeps them equal by construction, and the shared rate's gradient is the
    sum of both layers' contributions. Returns {follower: owner}.
    """
    return share_parameter(dict(masked_layers(model)), groups, "k_score")


def share_parameter(layers: Mapping[str, nn.Module], groups: List[List[str]], attribute: str) -> Dict[str, str]:
    """In each group, point every layer's `attribute` at the first layer's Parameter (one object, so one gradient:
    the sum of all the group's contributions). Returns {follower: owner}."""
    ties = {}
    for group in groups:
        owner = getattr(layers[group[0]], attribute)
        for follower_name in group[1:]:
            setattr(layers[follower_name], attribute, owner)
            ties[follower_name] = group[0]
    return ties


SCORE_INITS.add("magnitude", init_scores_from_weights)
