"""Verifiable Linf bounds for Hydra's certified objectives: IBP, symbolic intervals and CROWN-IBP.

- IBP (Gowal et al. 2018): propagate the input box [max(x - eps, clip_min), min(x + eps, clip_max)] layer by
  layer as centre +- radius (affine: W c + b +- |W| r; ReLU: monotone).
- Symbolic interval analysis (ReluVal / Neurify, as MixTrain, Wang et al. 2018, trains with it): every neuron
  is carried forward as centre + sum_k g_k e_k over e in [-1, 1]^K, with one generator per input element (its box
  radius) and one more per unstable ReLU. Affine steps map centre and generators exactly; a ReLU whose input
  range [l, u] (the concretised bounds of its symbolic input) straddles 0 is relaxed between the parallel lines
  s z and s (z - l) with s = u / (u - l): its output is s z - s l / 2 plus a new error generator of size -s l / 2
  (active ReLUs pass, dead ones give 0). The margin specification is applied to the symbolic logits exactly.
  It is not always tighter than IBP (one unstable ReLU's range becomes [s l, u] instead of [0, u]); it is
  whenever IBP finds no ReLU unstable (then it is exact).
- CROWN-IBP (Zhang et al., ICLR 2020): the IBP pre-activation bounds fix a linear relaxation of every ReLU,
  and CROWN's backward pass bounds the margin specification z_y - z_j linearly in the input, concretised on
  the input box. ReLU relaxation as Zhang et al.'s (and Hydra's) default: upper line through (l, 0) and
  (u, u); lower line of slope 1 where u > -l, else 0 (adaptive).
- Margins are bounded with the specification merged into the last linear layer (C W, C b), which is
  tighter than differencing logit intervals; Hydra's `BoundSequential.interval_range(C=...)` does the same.

Hydra (github.com/inspire-group/hydra) uses its own vendored bound code, not
auto_LiRPA; the PyPI `auto-lirpa` 0.3 needs torch < 1.13 and does not import with numpy 2 / torch 2.x. Like
Hydra's it accepts an `nn.Sequential` of Conv2d / Linear / ReLU / Flatten (nested Sequentials and
nn.Identity are flattened away). Two differences: masked layers bound their effective (masked) weight,
also while scores are learned (gradients reach scores and rates through the straight-through mask), and
a per-channel input normaliser (x - mean) / std (models.common.InputNormalize: tensors `mean`, `std`) is
bounded exactly. Hydra clamped the box to the batch's own min/max; we clamp to [clip_min, clip_max].
"""
from typing import Dict, Iterable, Iterator, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.errors import UserError
from pruning.layers import MaskedMixin
from utils.modes import eval_mode

IBP, SYMBOLIC, CROWN_IBP = "ibp", "sym", "crown-ibp"
METHODS = (IBP, SYMBOLIC, CROWN_IBP)
Box = Tuple[torch.Tensor, torch.Tensor]  # (lower, upper), same shape
# Points per symbolic pass: its generators hold (input elements + unstable ReLUs) x neurons values per point
# (MNIST cifar_model: up to 3920 x 3136 floats, 49 MB, per point at its first layer).
SYMBOLIC_CHUNK = 8


class Symbolic(NamedTuple):
    """A symbolic interval: centre [B, *shape] + sum_k generators[:, k] * e_k over e in [-1, 1]^K."""
    centre: torch.Tensor
    generators: torch.Tensor  # [B, K, *shape]

    def box(self) -> Box:
        radius = self.generators.abs().sum(dim=1)
        return self.centre - radius, self.centre + radius

    def mapped(self, fn) -> "Symbolic":
        """Through a map that is linear in the generators (fn of a [N, *shape] batch, no offset for them)."""
        batch, count = self.generators.shape[:2]
        generators = fn(self.generators.flatten(0, 1), False)
        return Symbolic(fn(self.centre, True), generators.view(batch, count, *generators.shape[1:]))


# ----------------------------------------------------------------------------- the supported steps
def _weight(layer: nn.Module) -> torch.Tensor:
    """The weight the layer computes with: W * M for masked layers (so masks apply), else W."""
    return layer.effective_weight() if isinstance(layer, MaskedMixin) else layer.weight


class _Affine:
    """A conv or linear layer; subclasses give the op and its adjoint.

    Every step has `interval(lower, upper) -> box` (IBP), `symbolic(value) -> value` (symbolic intervals) and
    `backward(coeff, entering_box) -> (coeff on its input, constant)` (one CROWN lower-bound step; `entering_box`
    is the IBP box of the step's input).
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        raise NotImplementedError

    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> Box:
        weight = _weight(self.layer)
        center = self.apply((upper + lower) / 2, weight, self.layer.bias)
        radius = self.apply((upper - lower) / 2, weight.abs(), None)
        return center - radius, center + radius

    def symbolic(self, value: Symbolic) -> Symbolic:
        weight = _weight(self.layer)
        return value.mapped(lambda x, with_bias: self.apply(x, weight, self.layer.bias if with_bias else None))


class _Linear(_Affine):
    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def backward(self, coeff: torch.Tensor, entering: Box) -> Tuple[torch.Tensor, torch.Tensor]:
        """coeff [B, S, out] on this layer's output -> (coeff on its input [B, S, in], constant [B, S])."""
        bias = self.layer.bias
        constant = coeff.matmul(bias) if bias is not None else coeff.new_zeros(coeff.shape[:2])
        return coeff.matmul(_weight(self.layer)), constant


class _Conv(_Affine):
    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        conv = self.layer
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def backward(self, coeff: torch.Tensor, entering: Box) -> Tuple[torch.Tensor, torch.Tensor]:
        conv = self.layer
        in_shape = entering[0].shape
        batch, specs = coeff.shape[:2]
        out_hw = coeff.shape[-2:]
        # conv_transpose2d is the adjoint of conv2d; output_padding restores input rows/columns that the
        # strided forward never reached (their coefficient is 0).
        output_padding = tuple(
            in_shape[-2 + d] - ((out_hw[d] - 1) * conv.stride[d] - 2 * conv.padding[d]
                                + conv.dilation[d] * (conv.kernel_size[d] - 1) + 1)
            for d in range(2))
        flat = coeff.reshape(batch * specs, *coeff.shape[2:])
        back = F.conv_transpose2d(flat, _weight(conv), None, conv.stride, conv.padding, output_padding,
                                  conv.groups, conv.dilation)
        constant = (coeff.sum(dim=(3, 4)) * conv.bias).sum(dim=2) if conv.bias is not None \
            else coeff.new_zeros(batch, specs)
        return back.view(batch, specs, *in_shape[1:]), constant


def _relu_relaxation(lower: torch.Tensor, upper: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(slope s, offset -s min(l, 0)) of the upper line through (min(l, 0), 0) and (max(u, 0), max(u, 0)) of relu on
    [l, u]: s = 1 for active, 0 for dead and u/(u-l) for unstable ReLUs, where the offset is positive."""
    lower, upper = lower.clamp(max=0), upper.clamp(min=0)
    upper = torch.maximum(upper, lower + 1e-8)  # l = u = 0: avoid 0/0 (either slope is exact there)
    slope = upper / (upper - lower)
    return slope, -lower * slope


class _ReLU:
    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> Box:
        return F.relu(lower), F.relu(upper)

    def symbolic(self, value: Symbolic) -> Symbolic:
        """relu(z) between the parallel lines s z and s z + offset: s z + offset / 2 plus one new error generator
        of size offset / 2 per unstable ReLU (per point, as many as the point with the most of them)."""
        slope, offset = _relu_relaxation(*value.box())
        half = offset / 2
        centre = value.centre * slope + half
        generators = value.generators * slope.unsqueeze(1)
        unstable = (half > 0).flatten(1)
        counts = unstable.sum(dim=1)
        new = int(counts.max()) if counts.numel() else 0
        if new == 0:
            return Symbolic(centre, generators)
        point, neuron = unstable.nonzero(as_tuple=True)
        rank = unstable.long().cumsum(dim=1)[point, neuron] - 1   # the k-th unstable ReLU of its point
        errors = half.new_zeros(half.shape[0], new, half[0].numel())
        errors = errors.index_put((point, rank, neuron), half.flatten(1)[point, neuron])
        errors = errors.view(half.shape[0], new, *half.shape[1:])
        return Symbolic(centre, torch.cat([generators, errors], dim=1))

    def backward(self, coeff: torch.Tensor, entering: Box) -> Tuple[torch.Tensor, torch.Tensor]:
        """Lower-bound step through relu(z), z in [l, u] (the IBP box entering the ReLU): positive coefficients
        take the lower line, negative ones the upper line (CROWN)."""
        upper_slope, upper_offset = (t.unsqueeze(1) for t in _relu_relaxation(*entering))
        lower_slope = (upper_slope > 0.5).to(coeff.dtype)  # slope 1 iff u > -l (adaptive)
        positive, negative = coeff.clamp(min=0), coeff.clamp(max=0)
        constant = (negative * upper_offset).flatten(2).sum(dim=2)
        return positive * lower_slope + negative * upper_slope, constant


class _Flatten:
    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> Box:
        return lower.flatten(1), upper.flatten(1)

    def symbolic(self, value: Symbolic) -> Symbolic:
        return Symbolic(value.centre.flatten(1), value.generators.flatten(2))

    def backward(self, coeff: torch.Tensor, entering: Box) -> Tuple[torch.Tensor, torch.Tensor]:
        return coeff.view(*coeff.shape[:2], *entering[0].shape[1:]), coeff.new_zeros(coeff.shape[:2])


class _Normalize:
    """(x - mean) / std per channel: increasing and affine, so its interval image is exact."""

    def __init__(self, module: nn.Module):
        self.module = module

    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> Box:
        return self.module(lower), self.module(upper)

    def symbolic(self, value: Symbolic) -> Symbolic:
        return value.mapped(lambda x, with_shift: self.module(x) if with_shift else x / self.module.std)

    def backward(self, coeff: torch.Tensor, entering: Box) -> Tuple[torch.Tensor, torch.Tensor]:
        scale = (1.0 / self.module.std).unsqueeze(1)           # [1, 1, C, 1, 1] against coeff [B, S, C, H, W]
        shift = (self.module.mean / self.module.std).unsqueeze(1)
        return coeff * scale, -(coeff * shift).flatten(2).sum(dim=2)


def _leaves(module: nn.Sequential, prefix: str = "") -> Iterator[Tuple[str, nn.Module]]:
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential):
            yield from _leaves(child, f"{prefix}{name}.")
        elif not isinstance(child, nn.Identity):
            yield f"{prefix}{name}", child


def _is_normalizer(module: nn.Module) -> bool:
    return (isinstance(getattr(module, "mean", None), torch.Tensor)
            and isinstance(getattr(module, "std", None), torch.Tensor)
            and not any(True for _ in module.parameters()) and not any(True for _ in module.children()))


def _step(name: str, module: nn.Module):
    if isinstance(module, nn.Linear):
        return _Linear(module)
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return _Conv(module)
    if isinstance(module, nn.ReLU):
        return _ReLU()
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return _Flatten()
    if _is_normalizer(module):
        return _Normalize(module)
    raise UserError(f"IBP/symbolic/CROWN-IBP bounds: unsupported module {name!r} ({module!r}); they need an "
                    f"nn.Sequential of Conv2d (zero padding), Linear, ReLU, Flatten, e.g. cifar_model or "
                    f"cifar_model_large")


def bound_steps(model: nn.Module) -> List:
    """The model as a list of bound-propagating steps; a one-line UserError names the first unsupported module."""
    if not isinstance(model, nn.Sequential):
        raise UserError(f"IBP/symbolic/CROWN-IBP bounds need an nn.Sequential model (e.g. cifar_model), "
                        f"got {type(model).__name__}")
    steps = [_step(name, module) for name, module in _leaves(model)]
    if not steps:
        raise UserError("IBP/symbolic/CROWN-IBP bounds: the model has no layers")
    return steps


# ----------------------------------------------------------------------------- IBP
def input_box(x: torch.Tensor, eps: float, clip_min: float = 0.0, clip_max: float = 1.0) -> Box:
    """The Linf eps-ball around x intersected with the valid input range."""
    return (x - eps).clamp(min=clip_min), (x + eps).clamp(max=clip_max)


def _propagate(steps: Sequence, box: Box) -> List[Box]:
    """IBP through every step; returns the box entering each step, then the output box."""
    boxes = [box]
    for step in steps:
        boxes.append(step.interval(*boxes[-1]))
    return boxes


def interval_bounds(model: nn.Module, x: torch.Tensor, eps: float, clip_min: float = 0.0,
                    clip_max: float = 1.0) -> Box:
    """IBP lower and upper bounds of every logit over the Linf eps-ball around x (clamped to the input range)."""
    return _propagate(bound_steps(model), input_box(x, eps, clip_min, clip_max))[-1]


def margin_specification(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """C [B, K, K] with row j = e_y - e_j, so C z = z_y - z_j (row y is zero: that margin is exactly 0)."""
    eye = torch.eye(num_classes, device=y.device, dtype=dtype)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def _batched_matvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """[B, S, N] x [B, ...] (N elements per point) -> [B, S]."""
    return matrix.bmm(vector.flatten(1).unsqueeze(-1)).squeeze(-1)


def _ibp_margins(steps: Sequence, boxes: List[Box], spec: torch.Tensor) -> torch.Tensor:
    """IBP lower bounds of spec @ logits: merged into the last layer when it is linear, else from the logit box."""
    last = steps[-1]
    if isinstance(last, _Linear):
        lower, upper = boxes[-2]
        weight = spec.matmul(_weight(last.layer))  # [B, K, in]: the spec merged into the last layer
        margins = _batched_matvec(weight, (upper + lower) / 2) - _batched_matvec(weight.abs(), (upper - lower) / 2)
        if last.layer.bias is not None:
            margins = margins + spec.matmul(last.layer.bias)
        return margins
    lower, upper = boxes[-1]
    return _batched_matvec(spec.clamp(min=0), lower) + _batched_matvec(spec.clamp(max=0), upper)


# ----------------------------------------------------------------------------- CROWN-IBP
def _crown_margins(steps: Sequence, boxes: List[Box], spec: torch.Tensor) -> torch.Tensor:
    """CROWN backward pass of the specification with the IBP boxes fixing every ReLU relaxation."""
    coeff, constant = spec, spec.new_zeros(spec.shape[:2])
    for index in range(len(steps) - 1, -1, -1):
        coeff, offset = steps[index].backward(coeff, boxes[index])
        constant = constant + offset
    lower, upper = boxes[0]
    flat = coeff.flatten(2)
    return _batched_matvec(flat, (upper + lower) / 2) - _batched_matvec(flat.abs(), (upper - lower) / 2) + constant


# ----------------------------------------------------------------------------- symbolic intervals
def _symbolic_margins(steps: Sequence, box: Box, y: torch.Tensor) -> torch.Tensor:
    """Symbolic interval analysis from the input box (one generator per input element, its radius) through every
    step; the margin specification applied to the symbolic logits, then concretised."""
    lower, upper = box
    radius = ((upper - lower) / 2).flatten(1)
    generators = torch.diag_embed(radius).view(radius.shape[0], radius.shape[1], *lower.shape[1:])
    value = Symbolic((upper + lower) / 2, generators)
    for step in steps:
        value = step.symbolic(value)
    logits = value.centre.flatten(1)
    spec = margin_specification(y, logits.shape[1], logits.dtype)
    spread = value.generators.flatten(2).matmul(spec.transpose(1, 2))  # [B, K, specs]: each generator's margins
    return _batched_matvec(spec, logits) - spread.abs().sum(dim=1)


def margin_lower_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str = IBP,
                        beta: float = 1.0, clip_min: float = 0.0, clip_max: float = 1.0) -> torch.Tensor:
    """Lower bounds of z_y - z_j over the eps-ball for every class j: [B, K], column y exactly 0.

    method 'ibp': IBP. 'sym': symbolic interval analysis (SYMBOLIC_CHUNK points per pass). 'crown-ibp':
    beta * CROWN-IBP + (1 - beta) * IBP (Zhang et al.; Hydra's mix), the CROWN pass skipped when beta == 0.
    All are valid bounds, so any mix in [0, 1] is too; neither CROWN nor IBP is always the tighter one, which
    is why the mix is ramped. Differentiable in the weights (and the scores and rates of masked layers in
    learn mode).
    """
    if method not in METHODS:
        raise UserError(f"unknown bound method {method!r}; choose one of: {', '.join(METHODS)}")
    if not 0.0 <= beta <= 1.0:
        raise UserError(f"CROWN-IBP beta must be in [0, 1], got {beta}")
    steps = bound_steps(model)
    box = input_box(x, eps, clip_min, clip_max)
    if method == SYMBOLIC:
        chunks = zip(*(t.split(SYMBOLIC_CHUNK) for t in (*box, y)))
        return torch.cat([_symbolic_margins(steps, (lower, upper), labels) for lower, upper, labels in chunks])
    boxes = _propagate(steps, box)
    spec = margin_specification(y, boxes[-1][0].shape[1], x.dtype)
    margins = _ibp_margins(steps, boxes, spec)
    if method == CROWN_IBP and beta > 0:
        margins = beta * _crown_margins(steps, boxes, spec) + (1 - beta) * margins
    return margins


def worst_case_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, method: str,
                    beta: float = 1.0, clip_min: float = 0.0,
                    clip_max: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """CE(-m, y) with m the margin lower bounds of `method`; returns (loss, -m). -m are the "worst-case logits",
    whose argmax is y exactly when the point is verified (MixTrain's and Hydra's robust cross-entropy)."""
    worst_logits = -margin_lower_bounds(model, x, y, eps, method, beta, clip_min, clip_max)
    return F.cross_entropy(worst_logits, y), worst_logits


def crown_ibp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, beta: float,
                   clip_min: float = 0.0, clip_max: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hydra's `crown-ibp` objective: CE(-m, y) with m = beta * CROWN-IBP + (1 - beta) * IBP margin bounds.

    Hydra's loss is this robust term only (its clean CE is logged, not optimised). The accuracy of the
    worst-case logits it returns is the verified training accuracy, so no extra clean forward is needed.
    """
    return worst_case_loss(model, x, y, eps=eps, method=CROWN_IBP, beta=beta, clip_min=clip_min, clip_max=clip_max)


# ----------------------------------------------------------------------------- evaluation
def _all_margins_positive(margins: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return margins.scatter(1, y[:, None], float("inf")).amin(dim=1) > 0


def verified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, method: str = IBP,
             beta: float = 1.0, clip_min: float = 0.0, clip_max: float = 1.0) -> torch.Tensor:
    """Bool [B]: every margin z_y - z_j (j != y) has a positive lower bound on the eps-ball."""
    with torch.no_grad():
        margins = margin_lower_bounds(model, x, y, eps, method, beta, clip_min, clip_max)
    return _all_margins_positive(margins, y)


def verification_sums(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *, eps: float,
                      method: str = IBP, beta: float = 1.0, clip_min: float = 0.0,
                      clip_max: float = 1.0) -> Dict[str, float]:
    """Sums in the shape of trainers.evaluation.validation.validate (validation, Hydra's `--val_method ibp`): n,
    natural_correct, natural_loss_sum, robust_correct = verified points, robust_loss_sum = CE(-m, y)."""
    device = next(model.parameters()).device
    sums = {k: torch.zeros((), device=device, dtype=torch.float64)
            for k in ("n", "natural_correct", "natural_loss_sum", "robust_correct", "robust_loss_sum")}
    with eval_mode(model), torch.no_grad():
        for x, y in batches:
            logits = model(x)
            margins = margin_lower_bounds(model, x, y, eps, method, beta, clip_min, clip_max)
            sums["n"] += y.shape[0]
            sums["natural_correct"] += (logits.argmax(dim=1) == y).sum()
            sums["natural_loss_sum"] += F.cross_entropy(logits, y, reduction="sum").double()
            sums["robust_correct"] += _all_margins_positive(margins, y).sum()
            sums["robust_loss_sum"] += F.cross_entropy(-margins, y, reduction="sum").double()
    return {k: float(v) for k, v in sums.items()}


def verified_accuracy(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *, eps: float,
                      method: str = IBP, beta: float = 1.0, clip_min: float = 0.0, clip_max: float = 1.0) -> float:
    """Percent of points verified robust at Linf eps (Hydra's evaluation: naive IBP, method='ibp'; its MixTrain
    runs: method='sym')."""
    sums = verification_sums(model, batches, eps=eps, method=method, beta=beta, clip_min=clip_min,
                             clip_max=clip_max)
    return 100.0 * sums["robust_correct"] / max(sums["n"], 1.0)


# ----------------------------------------------------------------------------- ramp-up
def crown_ibp_schedule(epoch: int, step: int, *, steps_per_epoch: int, eps: float, schedule_length: int,
                       schedule_start: int = 0, starting_eps: float = 0.0,
                       final_beta: float = 0.0) -> Tuple[float, float]:
    """(eps_t, beta_t) at optimizer step `step` of 0-based `epoch` (Hydra's crown/eps_scheduler.py, "linear").

    eps rises linearly per step from `starting_eps` at the start of epoch `schedule_start` to `eps` at the
    start of epoch schedule_start + schedule_length - 1 and stays there (schedule_length <= 1: no ramp).
    beta_t = (eps - eps_t * (1 - final_beta)) / eps: pure CROWN-IBP at the start, falling to `final_beta`
    (Hydra: 0, pure IBP) as eps_t reaches eps. Hydra's configs: eps 0.007, schedule_length 60 (120 in its
    SVHN pretrain script, 1 in prune/finetune), starting_eps 0. Hydra counted `schedule_start` in steps;
    here it is in epochs (the same for its default 0).
    """
    if eps <= 0:
        return 0.0, final_beta
    first = schedule_start * steps_per_epoch
    last = (schedule_start + schedule_length - 1) * steps_per_epoch
    now = epoch * steps_per_epoch + step
    if last <= first:
        eps_t = eps
    else:
        fraction = min(max((now - first) / (last - first), 0.0), 1.0)
        eps_t = starting_eps + fraction * (eps - starting_eps)
    return eps_t, (eps - eps_t * (1.0 - final_beta)) / eps
