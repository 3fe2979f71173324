"""Physically smaller exports of pruned models: a compact dense network (channel pruning; `save_compact` writes it
as a torch.export program) and a sparse file (weight pruning).

Channel granularity (`compact_model`): a masked layer's channel mask zeroes whole input channels (the
[:, c] slice of its weight). A channel of an intermediate tensor can be deleted from the network when no
consumer reads it; deleting it then removes the producer's output row, the BatchNorm entries in between
and the consumers' weight columns. The network is traced with torch.fx and analysed without knowing its
architecture:

- Operations that act on each channel separately (BatchNorm, ReLU and friends, pooling, dropout, +, -, *, /)
  tie their inputs and output into one "channel space": they must keep the same channels. A residual sum
  therefore keeps a channel when any consumer of either addend or of the sum reads it.
- A flatten from [N, C, H, W] to [N, C*H*W] maps channel c to the block of features c*H*W ... c*H*W + H*W-1.
- A conv/linear layer reads the channels where its (masked) weight has a non-zero column among the output
  rows it keeps; those rows are the channels its own output space keeps. The kept sets are the least fixed
  point of these rules, so a channel is only removed when every consumer ignores it. A dropped channel's
  value never matters, which is why BatchNorm's constant bias on a channel whose conv row is all zero is
  still kept when somebody reads it.
- The network's input and output, and every operation not listed above, keep all their channels (they are
  never sliced, so any operation is handled correctly, merely without savings through it).

Weight granularity (`save_sparse_checkpoint`): zeros are stored implicitly as delta-coded indices (the
narrowest integer type that holds the largest gap) plus the kept values, in a file `torch.load(...,
weights_only=True)` reads.
"""
import copy
import logging
import math
import operator
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from configs.errors import UserError
from pruning.graph import inspect_layers
from pruning.layers import WEIGHT, MaskedMixin
from pruning.wrap import RATE_KEY, SCORE_KEY, dense_state_dict, masked_layers
from utils.atomic import atomic_write
from utils.checkpoint import load_checkpoint, save_atomic
from utils.modes import eval_mode

log = logging.getLogger(__name__)

# Operations whose output channel c depends only on channel c of each input (same channel layout in and out).
_CHANNELWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                        nn.Hardtanh, nn.Hardswish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d,
                        nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_CHANNELWISE_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu,
                          torch.sigmoid, torch.tanh, F.hardtanh, F.dropout, F.avg_pool2d, F.adaptive_avg_pool2d,
                          operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
                          operator.iadd, operator.imul, torch.add, torch.sub, torch.mul, torch.div}
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "add", "add_", "sub", "sub_", "mul", "mul_", "div",
                        "div_", "neg", "contiguous", "clone"}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
# SyncBatchNorm (train.py's multi-GPU runs) computes what BatchNorm does in eval mode; the export gets the plain one.
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one example through the model's conv and linear layers (as shaped, not masked)."""
    return int(round(sum(layer.flops for layer in inspect_layers(model, example_input).layers.values()) / 2))


def compact_model(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """A plain network (nn.Conv2d/nn.Linear/nn.BatchNorm2d) without the channels the masks prune away.

    Args:
        model: a model whose masked layers (if any) have channel granularity; masks may be frozen or not.
        example_input: one batch the model accepts (its shape fixes the flatten block sizes).
    Returns:
        a torch.fx GraphModule in eval mode, with the original module names, that computes the masked
        model's eval-mode outputs (checked on `example_input`); it shares no tensor with `model`.
    Raises:
        UserError: weight-granular masks, a forward that torch.fx cannot trace, or a module that the graph
            calls twice with different channel sets.
    """
    weight_masked = [name for name, layer in masked_layers(model) if layer.granularity == WEIGHT]
    if weight_masked:
        raise UserError(f"compact_model needs channel-granular masks, but {weight_masked[0]} is weight-granular "
                        "(weight-pruned models shrink with save_sparse_checkpoint instead)")
    with eval_mode(model), torch.no_grad():
        compact = _trace(model)
        ShapeProp(compact).propagate(example_input)
        folded = dense_state_dict(model)
        _rebuild(compact, _ChannelSpaces(compact, folded), folded)
        _check_same_outputs(model(example_input), compact(example_input))
    before, after = count_macs(model, example_input), count_macs(compact, example_input)
    weights_before = sum(p.numel() for n, p in model.named_parameters() if not n.endswith((SCORE_KEY, RATE_KEY)))
    log.info("compact model: %d -> %d MACs per example (%.2fx fewer), %d -> %d parameters", before, after,
             before / max(after, 1), weights_before, sum(p.numel() for p in compact.parameters()))
    return compact


def save_compact(model: nn.Module, example_input: torch.Tensor, path: str, *, torchscript: bool = False) -> None:
    """Write a compact (plain) model that runs without this toolkit, atomically.

    By default as a torch.export program (`.pt2`: `torch.export.load(path).module()(x)`), exported in eval mode with
    a dynamic batch dimension (from two copies of `example_input`'s first example, since torch.export fixes a
    dimension of size 1). With `torchscript`, as TorchScript traced on `example_input` (`torch.jit.load(path)`), the
    format torch deprecates: it is written only when asked for.
    """
    still_masked = masked_layers(model)
    if still_masked:
        raise UserError(f"save_compact needs a plain model, but {still_masked[0][0]} is masked "
                        "(call pruning.compact.compact_model first)")
    with eval_mode(model), torch.no_grad():
        if torchscript:
            program = torch.jit.trace(model, example_input)
            atomic_write(path, lambda fh: torch.jit.save(program, fh), binary=True)
            return
        batch = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()
        program = torch.export.export(model, (batch,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    atomic_write(path, lambda fh: torch.export.save(program, fh), binary=True)


# ---------------------------------------------------------------------------------------------- tracing


class _MaskedLeafTracer(fx.Tracer):
    """Keeps masked layers as single call_module nodes (their forward caches masks in Python)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, MaskedMixin) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _MaskedLeafTracer().trace(model)
    except Exception as err:  # fx raises many types (TraceError, TypeError, RuntimeError) for untraceable code
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot compact {type(model).__name__}: torch.fx cannot trace its forward ({reason})") \
            from None
    # The GraphModule gets fresh container modules; its leaves and constants are the model's until _rebuild.
    return fx.GraphModule(model, graph, f"Compact{type(model).__name__}")


def _meta(node) -> Optional[TensorMetadata]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta if isinstance(meta, TensorMetadata) else None


def _tensor_inputs(node: fx.Node) -> List[fx.Node]:
    found: List[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if _meta(n) is not None else None)
    return found


# --------------------------------------------------------------------------------------------- analysis


class _ChannelSpaces:
    """Groups the traced tensors into channel spaces and finds which channels each space must keep.

    A space is a union-find class of fx nodes whose dim 1 (channels, or features after a flatten) must be
    sliced identically. Constants (get_attr) join a space with the dim that broadcasts against channels.
    """

    def __init__(self, graph_module: fx.GraphModule, folded: Mapping[str, torch.Tensor]):
        self.module = graph_module
        self._parent: Dict[fx.Node, fx.Node] = {}
        self.constant_dim: Dict[fx.Node, int] = {}
        self.layers: List[Tuple[fx.Node, torch.Tensor]] = []     # conv/linear node, [out, in] non-zero map
        self.weights: Dict[fx.Node, torch.Tensor] = {}           # conv/linear node -> masked weight
        self.flattens: List[Tuple[fx.Node, fx.Node, int]] = []   # flatten output, its input, block size
        self.opaque: List[str] = []
        forced: List[fx.Node] = []
        for node in graph_module.graph.nodes:
            self._classify(node, folded, forced)
        self.needed: Dict[fx.Node, torch.Tensor] = {}
        for node in self._parent:
            root = self.find(node)
            if root not in self.needed:
                self.needed[root] = torch.zeros(self.channels(root), dtype=torch.bool)
        for node in forced:
            if node in self._parent:
                self.needed[self.find(node)][:] = True
        self._check_flattens()
        self._solve()
        if self.opaque:
            log.info("compact: kept every channel through %s", ", ".join(sorted(set(self.opaque))))

    # ---- union-find over tensor nodes
    def _add(self, node: fx.Node) -> None:
        self._parent.setdefault(node, node)

    def find(self, node: fx.Node) -> fx.Node:
        while self._parent[node] is not node:
            self._parent[node] = self._parent[self._parent[node]]
            node = self._parent[node]
        return node

    def _union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self._parent[rb] = ra

    def channels(self, node: fx.Node) -> int:
        meta = _meta(node)
        return meta.shape[self.constant_dim.get(node, 1)]

    # ---- building the spaces
    def _classify(self, node: fx.Node, folded: Mapping[str, torch.Tensor], forced: List[fx.Node]) -> None:
        meta = _meta(node)
        if meta is not None and len(meta.shape) >= 2 and node.op != "get_attr":
            self._add(node)
        if node.op in ("placeholder", "get_attr"):
            if node.op == "placeholder":
                forced.append(node)  # the caller's input keeps its layout
            return
        if node.op == "output":
            forced.extend(_tensor_inputs(node))
            return
        if self._layer(node, folded) or self._channelwise(node) or self._flatten(node) or self._reads_batch_size(node):
            return
        self.opaque.append(self._describe(node))
        forced.extend(_tensor_inputs(node))
        if node in self._parent:
            forced.append(node)

    def _describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return type(self.module.get_submodule(node.target)).__name__
        return getattr(node.target, "__name__", str(node.target))

    def _layer(self, node: fx.Node, folded: Mapping[str, torch.Tensor]) -> bool:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return False
        module = self.module.get_submodule(node.target)
        source = node.args[0]
        if not (isinstance(module, (nn.Conv2d, nn.Linear)) and source in self._parent and node in self._parent):
            return False
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or len(_meta(source).shape) != 4):
            return False
        if isinstance(module, nn.Linear) and len(_meta(source).shape) != 2:
            return False
        weight = folded.get(f"{node.target}.weight", module.weight).detach()
        nonzero = weight.reshape(weight.shape[0], weight.shape[1], -1).ne(0).any(dim=2).cpu()
        self.layers.append((node, nonzero))
        self.weights[node] = weight
        return True

    def _channelwise(self, node: fx.Node) -> bool:
        if node not in self._parent:
            return False
        if node.op == "call_module":
            module = self.module.get_submodule(node.target)
            if not isinstance(module, _CHANNELWISE_MODULES + _BATCH_NORMS):
                return False
            operands = [arg for arg in node.args[:1] if _meta(arg) is not None]
        elif node.op == "call_function" and node.target in _CHANNELWISE_FUNCTIONS:
            operands = _tensor_inputs(node)
        elif node.op == "call_method" and node.target in _CHANNELWISE_METHODS:
            operands = _tensor_inputs(node)
        else:
            return False
        out_shape = _meta(node).shape
        joins = []
        for operand in operands:
            shape = _meta(operand).shape
            dim = 1 - (len(out_shape) - len(shape))  # the operand's dim that broadcasts against channels
            if dim < 0 or (shape[dim] == 1 and out_shape[1] != 1):
                continue
            if shape[dim] != out_shape[1]:
                return False
            if operand.op == "get_attr":
                if self.constant_dim.get(operand, dim) != dim:
                    return False
            elif dim != 1 or operand not in self._parent:
                return False
            joins.append((operand, dim))
        for operand, dim in joins:
            if operand.op == "get_attr":
                self.constant_dim[operand] = dim
                self._add(operand)
            self._union(node, operand)
        return True

    def _flatten(self, node: fx.Node) -> bool:
        is_reshape = ((node.op == "call_function" and node.target is torch.flatten)
                      or (node.op == "call_method" and node.target in _RESHAPE_METHODS)
                      or (node.op == "call_module" and isinstance(self.module.get_submodule(node.target), nn.Flatten)))
        source = node.args[0] if node.args else None
        if not (is_reshape and source in self._parent and node in self._parent):
            return False
        in_shape, out_shape = _meta(source).shape, _meta(node).shape
        if node.op == "call_method" and node.target in ("view", "reshape"):
            sizes = node.args[1:]
            sizes = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes
            if len(sizes) != 2 or sizes[-1] != -1:
                return False  # a hard-coded feature count would not follow the compacted width
        if tuple(out_shape) == tuple(in_shape):
            self._union(node, source)
            return True
        if len(out_shape) == 2 and out_shape[0] == in_shape[0] and out_shape[1] == math.prod(in_shape[1:]):
            self.flattens.append((node, source, math.prod(in_shape[2:])))
            return True
        return False

    @staticmethod
    def _reads_batch_size(node: fx.Node) -> bool:
        """`x.size(0)` (as in x.view(x.size(0), -1)) does not depend on which channels x keeps."""
        return node.op == "call_method" and node.target == "size" and tuple(node.args[1:]) == (0,)

    def _check_flattens(self) -> None:
        parents: Dict[fx.Node, Tuple[fx.Node, int]] = {}
        for flat, source, block in self.flattens:
            key, value = self.find(flat), (self.find(source), block)
            if parents.setdefault(key, value) != value:
                raise UserError(f"cannot compact: {flat.name} joins two flattened tensors of different layouts")
        self.derived = parents

    # ---- liveness
    def kept_mask(self, node: fx.Node) -> torch.Tensor:
        """Channels of a space that stay, during the fixed-point iteration (may be empty)."""
        root = self.find(node)
        if root in self.derived:
            parent, block = self.derived[root]
            return self.kept_mask(parent).repeat_interleave(block)
        return self.needed[root]

    def kept_index(self, node: fx.Node) -> torch.Tensor:
        """Indices of the channels a space keeps in the compact model (at least one, so every layer has a shape;
        a space nobody reads keeps its first channel, whose value then never matters)."""
        root = self.find(node)
        if root in self.derived:
            parent, block = self.derived[root]
            channels = self.kept_index(parent)
            return (channels[:, None] * block + torch.arange(block)).reshape(-1)
        mask = self.needed[root].clone()
        if not mask.any():
            mask[0] = True
        return mask.nonzero().reshape(-1)

    def _solve(self) -> None:
        """Grow each space's needed channels until every layer's non-zero columns (over the rows it keeps)
        and every flatten's blocks are covered: the least set in which no kept value reads a removed one."""
        changed = True
        while changed:
            changed = False
            for node, nonzero in reversed(self.layers):
                changed |= self._require(node.args[0], nonzero[self.kept_mask(node)].any(dim=0))
            for flat, (parent, block) in self.derived.items():
                changed |= self._require(parent, self.needed[flat].reshape(-1, block).any(dim=1))

    def _require(self, node: fx.Node, channels: torch.Tensor) -> bool:
        needed = self.needed[self.find(node)]
        if bool((channels & ~needed).any()):
            needed |= channels
            return True
        return False


# ------------------------------------------------------------------------------------------- rebuilding


def _rebuild(graph_module: fx.GraphModule, spaces: _ChannelSpaces, folded: Mapping[str, torch.Tensor]) -> None:
    """Replace, in place, every module and constant the graph uses by a fresh copy, sliced to the kept channels:
    afterwards the GraphModule shares no tensor with the traced model."""
    built: Dict[str, object] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            if node in spaces.weights:
                rows, cols = spaces.kept_index(node), spaces.kept_index(node.args[0])
                new, signature = _sliced_layer(module, spaces.weights[node], rows, cols), (rows.tolist(), cols.tolist())
            elif isinstance(module, _BATCH_NORMS):
                keep = spaces.kept_index(node)
                plain = nn.BatchNorm2d if len(_meta(node).shape) == 4 else nn.BatchNorm1d
                new, signature = _sliced_batch_norm(module, keep, plain), keep.tolist()
            elif isinstance(module, MaskedMixin):  # a masked layer the analysis left whole (e.g. grouped)
                weight = folded[f"{node.target}.weight"]
                new = _sliced_layer(module, weight, torch.arange(weight.shape[0]), torch.arange(weight.shape[1]))
                signature = None
            else:
                new, signature = copy.deepcopy(module), None
            _install(graph_module, node.target, new, signature, built)
        elif node.op == "get_attr":
            value, signature = _attribute(graph_module, node.target), None
            if isinstance(value, torch.Tensor):
                is_parameter, requires_grad = isinstance(value, nn.Parameter), value.requires_grad
                if node in spaces.constant_dim:
                    keep = spaces.kept_index(node)
                    value = value.index_select(spaces.constant_dim[node], keep.to(value.device))
                    signature = keep.tolist()
                value = value.detach().clone()
                value = nn.Parameter(value, requires_grad) if is_parameter else value
            _install(graph_module, node.target, value, signature, built)
    graph_module.eval()


def _install(graph_module: fx.GraphModule, target: str, value, signature, built: Dict[str, object]) -> None:
    if target in built:
        if built[target] != signature:
            raise UserError(f"cannot compact: {target} is used twice with different channel sets")
        return
    built[target] = signature
    owner_name, _, field = target.rpartition(".")
    owner = graph_module.get_submodule(owner_name)
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        delattr(owner, field)
        owner.register_buffer(field, value)
    else:
        setattr(owner, field, value)


def _attribute(root: nn.Module, target: str):
    owner_name, _, field = target.rpartition(".")
    return getattr(root.get_submodule(owner_name), field)


def _sliced_layer(module: nn.Module, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> nn.Module:
    """Plain nn.Conv2d / nn.Linear holding weight[rows][:, cols] (and bias[rows])."""
    rows, cols = rows.to(weight.device), cols.to(weight.device)
    factory = {"device": weight.device, "dtype": weight.dtype}
    has_bias = module.bias is not None
    if isinstance(module, nn.Conv2d):
        new = nn.Conv2d(len(cols) * module.groups, len(rows), module.kernel_size, stride=module.stride,
                        padding=module.padding, dilation=module.dilation, groups=module.groups, bias=has_bias,
                        padding_mode=module.padding_mode, **factory)
    else:
        new = nn.Linear(len(cols), len(rows), bias=has_bias, **factory)
    with torch.no_grad():
        new.weight.copy_(weight.index_select(0, rows).index_select(1, cols))
        if has_bias:
            new.bias.copy_(module.bias.index_select(0, rows))
    return new


def _sliced_batch_norm(module: nn.Module, keep: torch.Tensor, plain: type) -> nn.Module:
    """The same BatchNorm (as the `plain` class) over the kept channels: affine terms and running statistics sliced."""
    state = module.state_dict()
    like = next(iter(state.values()), torch.empty(0))
    new = plain(len(keep), eps=module.eps, momentum=module.momentum, affine=module.affine,
                       track_running_stats=module.track_running_stats, device=like.device,
                       dtype=like.dtype if like.is_floating_point() else None)
    keep = keep.to(like.device)
    new.load_state_dict({name: value.index_select(0, keep) if value.dim() == 1 else value.clone()
                         for name, value in state.items()})
    return new


def _check_same_outputs(expected, actual) -> None:
    """The compaction is exact up to float summation order; a larger gap means an operation was misread."""
    pairs = list(zip(expected, actual)) if isinstance(expected, (tuple, list)) else [(expected, actual)]
    for want, got in pairs:
        gap = float((want - got).abs().max())
        if gap > 1e-4 * max(1.0, float(want.abs().max())):
            raise RuntimeError(f"compact model differs from the masked model by {gap:g} on the example input")


# ------------------------------------------------------------------------------------ sparse checkpoints

SPARSE_FORMAT = "harp-sparse-state-dict"
SPARSE_VERSION = 1
_DELTA_TYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)  # narrowest first


def save_sparse_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str) -> None:
    """Write a state dict with zeros stored implicitly (atomic write; read back with load_sparse_checkpoint).

    A floating tensor is stored as the gaps between its non-zero flat indices (uint8/int16/int32/int64, the
    narrowest that holds the largest gap) and its non-zero values in their own dtype, whenever that is smaller
    than storing it densely; everything else (BN statistics, biases, integer tensors) is stored as is.
    Loaded tensors equal the saved ones (torch.equal); a negative zero (a masked negative weight, W * 0) comes
    back as +0.0, since storing the sign of every pruned weight would cost as much as a dense file.
    """
    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"save_sparse_checkpoint: state_dict entry {key} is a {type(value).__name__}, not a tensor")
        tensors[key] = _encode(value.detach().cpu())
    save_atomic({"format": SPARSE_FORMAT, "version": SPARSE_VERSION, "tensors": tensors}, path)


def load_sparse_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The state dict that save_sparse_checkpoint wrote (CPU tensors, original shapes, dtypes and key order)."""
    blob = load_checkpoint(path)
    if blob.get("format") != SPARSE_FORMAT:
        raise UserError(f"{path} is not a sparse checkpoint (written by pruning.compact.save_sparse_checkpoint)")
    if blob.get("version") != SPARSE_VERSION:
        raise UserError(f"{path} has sparse format version {blob.get('version')}; this toolkit reads {SPARSE_VERSION}")
    return {key: _decode(entry) for key, entry in blob["tensors"].items()}


def _encode(tensor: torch.Tensor) -> Dict:
    if tensor.is_floating_point() and tensor.numel() > 0:
        flat = tensor.reshape(-1)
        index = flat.ne(0).nonzero().reshape(-1)
        gaps = torch.diff(index, prepend=index.new_zeros(1))  # first entry: the first index itself
        largest = int(gaps.max()) if gaps.numel() else 0
        delta_type = next(t for t in _DELTA_TYPES if largest <= torch.iinfo(t).max)
        sparse_bytes = index.numel() * (flat.element_size() + torch.iinfo(delta_type).bits // 8)
        if sparse_bytes < flat.numel() * flat.element_size():
            return {"shape": list(tensor.shape), "deltas": gaps.to(delta_type), "values": flat[index].clone()}
    # clone: torch.save writes a view's whole storage
    return {"dense": tensor.clone()}


def _decode(entry: Mapping) -> torch.Tensor:
    if "dense" in entry:
        return entry["dense"]
    values = entry["values"]
    flat = torch.zeros(math.prod(entry["shape"]), dtype=values.dtype)
    flat[entry["deltas"].long().cumsum(0)] = values
    return flat.reshape(entry["shape"])
