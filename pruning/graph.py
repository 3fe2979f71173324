"""One hook pass over a model to learn, without knowing its architecture, what the pruning code needs:

- each prunable layer's per-example FLOPs (from its actual output size),
- which layers read the very same input tensor (a block's conv1 and its shortcut): under channel
  granularity they must keep the same number of input channels, so their rates are tied,
- which prunable layers consume each layer's output (through BN, ReLU, residual additions, pooling):
  their input keep rates decide how many of its output channels survive.
"""
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn as nn

from pruning.wrap import prunable_layers
from utils.modes import eval_mode


@dataclass
class LayerInfo:
    name: str
    weight_count: int
    flops: float                     # 2 * multiply-accumulates for one example
    in_channels: int
    consumers: List[str] = field(default_factory=list)


@dataclass
class LayerGraph:
    layers: Dict[str, LayerInfo]     # registration order
    tie_groups: List[List[str]]      # layers that share an input tensor, first = the one that owns the rate


def inspect_layers(model: nn.Module, example: torch.Tensor) -> LayerGraph:
    layers = dict(prunable_layers(model))
    inputs, outputs_by_node, infos = {}, {}, {}

    def hook(name):
        def fn(module, args, output):
            (x,) = args[:1]
            inputs[name] = x
            outputs_by_node[output.grad_fn] = name
            per_example = output[0].numel()
            fan_in = module.weight[0].numel()  # (C_in / groups) * kh * kw, or in_features
            infos[name] = LayerInfo(name, module.weight.numel(), 2.0 * per_example * fan_in, module.weight.shape[1])
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        with eval_mode(model), torch.enable_grad():
            model(example.detach().clone().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()

    for name, x in inputs.items():
        for producer in _producers(x.grad_fn, outputs_by_node):
            infos[producer].consumers.append(name)

    groups: Dict[int, List[str]] = {}
    for name in layers:
        if name in inputs:
            groups.setdefault(id(inputs[name]), []).append(name)
    tie_groups = [g for g in groups.values() if len(g) > 1]
    return LayerGraph({n: infos[n] for n in layers if n in infos}, tie_groups)


def _producers(node, outputs_by_node) -> List[str]:
    """Prunable layers whose outputs reach `node` through non-prunable operations only."""
    found, stack, seen = [], [node], set()
    while stack:
        current = stack.pop()
        if current is None or current in seen:
            continue
        seen.add(current)
        if current in outputs_by_node:
            found.append(outputs_by_node[current])
            continue
        stack.extend(next_fn for next_fn, _ in current.next_functions)
    return found
