"""Heracles' per-layer keep-ratio lists: which list position is which of our layers.

Heracles (Zhao, Königl & Wressnegger, "Non-Uniform Adversarially Robust Pruning", AutoML 2022) stores a
strategy as a bare list, ``{arch: {"weight"|"channel": {stg_id: [keep ratio per layer]}}}``, in the order
in which its TensorFlow models create their weights. That order is not our module registration order:

- weight lists have one entry per prunable layer, and every downsampling block creates its 1x1 shortcut
  BEFORE the block's convs (``modules._residual_block_first`` / ``_residual_block_first_preact`` /
  ``_residual_block_bottleneck`` in intellisec/heracles ``nn/modules.py``; the strategy plots in
  ``stgplots/*.tex`` label the positions ``1, 2-1-1, ..., 3-short, 3-1-1, ...``). Our models register the
  shortcut after the block's last conv, so position i is not our i-th layer;
- channel lists leave the shortcuts out (``robust_global_prune_env._build_index`` drops every weight named
  ``shortcut``): one entry per remaining layer, in registration order, each the keep ratio of that
  layer's INPUT channels (entry 0 is the image's; Heracles' searched lists keep it at 1.0). A shortcut
  reads the same tensor as its block's first conv, so it takes that conv's entry (``_global_pruning``
  copies it; hydra-nonuniform's ``parse_prune_stg`` and HARP's parser read the same positions: resnet18
  5, 9, 13; wrn_28_4 1, 9, 17; ResNet50 1, 10, 22, 40).

The tables below map each list position of Heracles' four architectures to our module names. Where a
consumer read a position wrongly we follow Heracles' models, not the consumer:

- HARP read resnet18 weight shortcuts at 7, 12, 17 (registration order; a bug of the original code, see README, Differences from the original code);
- hydra-nonuniform reads ResNet50 weight shortcuts at 1, 11, 24, 42, but Heracles' ResNet50 creates
  layer4.0's downsample at 43 (its plot label ``5-short`` is the 44th tick), so hydra-nonuniform gives
  layer4.0.downsample.0 the value of layer3.5.conv3 and shifts layer4's convs by one.

Any other architecture lists every prunable layer in registration order for both granularities (no
shortcut is left out: without the model we cannot know which layers share an input).

Imports only the standard library and ``configs.errors``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from configs.errors import UserError

__all__ = ["GRANULARITIES", "HERACLES_ARCHS", "ListOrder", "list_order", "rates_from_list", "list_from_rates",
           "checked_keep_ratio"]

GRANULARITIES = ("weight", "channel")

# ---------------------------------------------------------------------------------------------- tables
# Position i of the tuple = index i of a Heracles list. Comments give Heracles' plot labels
# (stgplots/<arch>.tex): "<stage>-<block>-<conv>" with stage 1 the stem, "short" the block's shortcut.

_VGG16_BN = (  # vgg16_bn, both granularities: 13 convs then 3 linear layers, registration order (16)
    "features.0", "features.3",                                  # 1, 2
    "features.7", "features.10",                                 # 3, 4
    "features.14", "features.17", "features.20",                 # 5-7
    "features.24", "features.27", "features.30",                 # 8-10
    "features.34", "features.37", "features.40",                 # 11-13
    "classifier.0", "classifier.2", "classifier.4",              # fc1-fc3
)

_RESNET18_WEIGHT = (  # 21: shortcut first in layer2/3/4 (positions 5, 10, 15)
    "conv1",                                                                                  # 0: 1
    "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",                   # 1-4: 2-x-x
    "layer2.0.shortcut.0",                                                                    # 5: 3-short
    "layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2",                   # 6-9
    "layer3.0.shortcut.0",                                                                    # 10: 4-short
    "layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2",                   # 11-14
    "layer4.0.shortcut.0",                                                                    # 15: 5-short
    "layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2",                   # 16-19
    "linear",                                                                                 # 20: fc1
)
_RESNET18_CHANNEL = (  # 18: no shortcuts; registration order
    "conv1",                                                                                  # 0
    "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",                   # 1-4
    "layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2",                   # 5-8
    "layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2",                   # 9-12
    "layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2",                   # 13-16
    "linear",                                                                                 # 17
)
_RESNET18_TIED = {f"layer{s}.0.shortcut.0": f"layer{s}.0.conv1" for s in (2, 3, 4)}

_WRN_28_4_WEIGHT = (  # 29: convShortcut first in each group's first block (positions 1, 10, 19)
    "conv1",                                                                                  # 0: 1
    "block1.layer.0.convShortcut",                                                            # 1: 2-short
    "block1.layer.0.conv1", "block1.layer.0.conv2", "block1.layer.1.conv1", "block1.layer.1.conv2",
    "block1.layer.2.conv1", "block1.layer.2.conv2", "block1.layer.3.conv1", "block1.layer.3.conv2",  # 2-9
    "block2.layer.0.convShortcut",                                                            # 10: 3-short
    "block2.layer.0.conv1", "block2.layer.0.conv2", "block2.layer.1.conv1", "block2.layer.1.conv2",
    "block2.layer.2.conv1", "block2.layer.2.conv2", "block2.layer.3.conv1", "block2.layer.3.conv2",  # 11-18
    "block3.layer.0.convShortcut",                                                            # 19: 4-short
    "block3.layer.0.conv1", "block3.layer.0.conv2", "block3.layer.1.conv1", "block3.layer.1.conv2",
    "block3.layer.2.conv1", "block3.layer.2.conv2", "block3.layer.3.conv1", "block3.layer.3.conv2",  # 20-27
    "fc",                                                                                     # 28: fc1
)
_WRN_28_4_CHANNEL = (  # 26: no convShortcut; registration order
    "conv1",                                                                                  # 0
    "block1.layer.0.conv1", "block1.layer.0.conv2", "block1.layer.1.conv1", "block1.layer.1.conv2",
    "block1.layer.2.conv1", "block1.layer.2.conv2", "block1.layer.3.conv1", "block1.layer.3.conv2",  # 1-8
    "block2.layer.0.conv1", "block2.layer.0.conv2", "block2.layer.1.conv1", "block2.layer.1.conv2",
    "block2.layer.2.conv1", "block2.layer.2.conv2", "block2.layer.3.conv1", "block2.layer.3.conv2",  # 9-16
    "block3.layer.0.conv1", "block3.layer.0.conv2", "block3.layer.1.conv1", "block3.layer.1.conv2",
    "block3.layer.2.conv1", "block3.layer.2.conv2", "block3.layer.3.conv1", "block3.layer.3.conv2",  # 17-24
    "fc",                                                                                     # 25
)
_WRN_28_4_TIED = {f"block{g}.layer.0.convShortcut": f"block{g}.layer.0.conv1" for g in (1, 2, 3)}

_RESNET50_WEIGHT = (  # 54: downsample first in each stage's first block (positions 1, 11, 24, 43)
    "conv1",                                                                                  # 0: 1
    "layer1.0.downsample.0",                                                                  # 1: 2-short
    "layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3",                                     # 2-4
    "layer1.1.conv1", "layer1.1.conv2", "layer1.1.conv3",                                     # 5-7
    "layer1.2.conv1", "layer1.2.conv2", "layer1.2.conv3",                                     # 8-10
    "layer2.0.downsample.0",                                                                  # 11: 3-short
    "layer2.0.conv1", "layer2.0.conv2", "layer2.0.conv3",                                     # 12-14
    "layer2.1.conv1", "layer2.1.conv2", "layer2.1.conv3",                                     # 15-17
    "layer2.2.conv1", "layer2.2.conv2", "layer2.2.conv3",                                     # 18-20
    "layer2.3.conv1", "layer2.3.conv2", "layer2.3.conv3",                                     # 21-23
    "layer3.0.downsample.0",                                                                  # 24: 4-short
    "layer3.0.conv1", "layer3.0.conv2", "layer3.0.conv3",                                     # 25-27
    "layer3.1.conv1", "layer3.1.conv2", "layer3.1.conv3",                                     # 28-30
    "layer3.2.conv1", "layer3.2.conv2", "layer3.2.conv3",                                     # 31-33
    "layer3.3.conv1", "layer3.3.conv2", "layer3.3.conv3",                                     # 34-36
    "layer3.4.conv1", "layer3.4.conv2", "layer3.4.conv3",                                     # 37-39
    "layer3.5.conv1", "layer3.5.conv2", "layer3.5.conv3",                                     # 40-42
    "layer4.0.downsample.0",                                                                  # 43: 5-short
    "layer4.0.conv1", "layer4.0.conv2", "layer4.0.conv3",                                     # 44-46
    "layer4.1.conv1", "layer4.1.conv2", "layer4.1.conv3",                                     # 47-49
    "layer4.2.conv1", "layer4.2.conv2", "layer4.2.conv3",                                     # 50-52
    "fc",                                                                                     # 53: fc
)
_RESNET50_CHANNEL = tuple(name for name in _RESNET50_WEIGHT if ".downsample." not in name)  # 50, same order
_RESNET50_TIED = {f"layer{s}.0.downsample.0": f"layer{s}.0.conv1" for s in (1, 2, 3, 4)}

_TABLES: dict[tuple[str, str], tuple[tuple[str, ...], dict[str, str]]] = {
    ("vgg16_bn", "weight"): (_VGG16_BN, {}),
    ("vgg16_bn", "channel"): (_VGG16_BN, {}),
    ("resnet18", "weight"): (_RESNET18_WEIGHT, {}),
    ("resnet18", "channel"): (_RESNET18_CHANNEL, _RESNET18_TIED),
    ("wrn_28_4", "weight"): (_WRN_28_4_WEIGHT, {}),
    ("wrn_28_4", "channel"): (_WRN_28_4_CHANNEL, _WRN_28_4_TIED),
    ("ResNet50", "weight"): (_RESNET50_WEIGHT, {}),
    ("ResNet50", "channel"): (_RESNET50_CHANNEL, _RESNET50_TIED),
}
HERACLES_ARCHS = tuple(sorted({arch for arch, _ in _TABLES}))


@dataclass(frozen=True)
class ListOrder:
    """How a Heracles list maps to layers: ``positions[i]`` is the layer at list index i; each layer in
    ``tied`` is not in the list and takes the value of the listed layer it maps to. ``layers`` are the
    model's prunable layers in registration order (the order of every dict this module returns)."""

    arch: str
    granularity: str
    layers: tuple[str, ...]
    positions: tuple[str, ...]
    tied: Mapping[str, str] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """A few words for messages: which order the list is read in."""
        if (self.arch, self.granularity) in _TABLES:
            return f"Heracles' {self.arch} {self.granularity} order"
        return f"registration order of {self.arch}'s prunable layers"


def list_order(arch: str, granularity: str, layer_names: Sequence[str]) -> ListOrder:
    """The list order for ``arch``/``granularity``, checked against the model's prunable layer names.

    ``layer_names`` are the model's conv/linear module names in registration order. For Heracles' four
    architectures the table must cover exactly these names (else :class:`UserError`); for any other
    architecture the list order is ``layer_names`` itself.
    """
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown pruning granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)}")
    names = list(layer_names)
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")
    table = _TABLES.get((arch, granularity))
    if table is None:
        return ListOrder(arch, granularity, tuple(names), tuple(names), {})
    positions, tied = table
    covered = set(positions) | set(tied)
    if covered != set(names):
        missing, extra = sorted(covered - set(names)), sorted(set(names) - covered)
        raise UserError(f"the model's layers do not match Heracles' {arch} table: not in the model "
                        f"{missing[:4]}, not in the table {extra[:4]}")
    return ListOrder(arch, granularity, tuple(names), positions, dict(tied))


def rates_from_list(order: ListOrder, values: Sequence[float], what: str = "strategy") -> dict[str, float]:
    """``{layer name: keep}`` (in registration order) from a Heracles list; ``what`` names the list in
    error messages.

    A wrong length or a value outside (0, 1] raises a one-line :class:`UserError`.
    """
    if not isinstance(values, (list, tuple)):
        raise UserError(f"{what} must be a list of keep ratios, got {type(values).__name__}")
    if len(values) != len(order.positions):
        left_out = f"; {len(order.tied)} shortcut(s) left out" if order.tied else ""
        raise UserError(f"{what} has {len(values)} entries, but {order.source} has {len(order.positions)}"
                        f"{left_out}")
    rates = {}
    for i, (name, value) in enumerate(zip(order.positions, values)):
        rates[name] = checked_keep_ratio(value, f"{what} entry {i} ({name})")
    for follower, owner in order.tied.items():
        rates[follower] = rates[owner]
    return {name: rates[name] for name in order.layers}


def list_from_rates(order: ListOrder, rates: Mapping[str, float], what: str = "strategy",
                    tie_tolerance: float = 1e-6) -> list[float]:
    """The Heracles list for ``{layer name: keep}``; the inverse of :func:`rates_from_list`.

    ``rates`` must name exactly the order's layers. A tied layer (left out of a channel list) must keep
    the same ratio as the layer it follows, within ``tie_tolerance``, or the list cannot express it.
    """
    expected = set(order.positions) | set(order.tied)
    if set(rates) != expected:
        missing, extra = sorted(expected - set(rates)), sorted(set(rates) - expected)
        raise UserError(f"{what} does not match the model's layers: missing {missing[:4]}, unknown {extra[:4]}")
    values = [checked_keep_ratio(rates[name], f"{what} layer {name}") for name in order.positions]
    for follower, owner in order.tied.items():
        if abs(float(rates[follower]) - float(rates[owner])) > tie_tolerance:
            raise UserError(f"{what}: {follower} keeps {float(rates[follower]):.6g} but {owner} keeps "
                            f"{float(rates[owner]):.6g}; a Heracles {order.granularity} list has one entry for both")
    return values


def checked_keep_ratio(value: object, where: str) -> float:
    """``value`` as a float keep ratio in (0, 1]; otherwise a one-line UserError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where} is {value!r}, not a number")
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise UserError(f"{where} is {value:g}, not a keep ratio in (0, 1]")
    return value
