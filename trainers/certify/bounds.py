"""Verifiable Linf bounds for Hydra's certified objectives: IBP and CROWN-IBP.

- IBP (Gowal et al. 2018): propagate the input box [max(x - eps, clip_min), min(x + eps, clip_max)] layer by
  layer as centre +- radius (affine: W c + b +- |W| r; ReLU: monotone).
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
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.errors import UserError
from pruning.layers import MaskedMixin
from utils.modes import eval_mode

IBP, CROWN_IBP = "ibp", "crown-ibp"
METHODS = (IBP, CROWN_IBP)
Box = Tuple[torch.Tensor, torch.Tensor]  # (lower, upper), same shape


# ----------------------------------------------------------------------------- the supported steps
def _weight(layer: nn.Module) -> torch.Tensor:
    """The weight the layer computes with: W * M for masked layers (so masks apply), else W."""
    return layer.effective_weight() if isinstance(layer, MaskedMixin) else layer.weight


class _Affine:
    """A conv or linear layer; subclasses give the op and its adjoint.

    Every step has `interval(lower, upper) -> box` (IBP) and `backward(coeff, entering_box) -> (coeff on its
    input, constant)` (one CROWN lower-bound step; `entering_box` is the IBP box of the step's input).
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


class _ReLU:
    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> Box:
        return F.relu(lower), F.relu(upper)

    def backward(self, coeff: torch.Tensor, entering: Box) -> Tuple[torch.Tensor, torch.Tensor]:
        """Lower-bound step through relu(z), z in [l, u] (the IBP box entering the ReLU): positive coefficients
        take the lower line, negative ones the upper line (CROWN)."""
        lower = entering[0].clamp(max=0).unsqueeze(1)
        upper = entering[1].clamp(min=0).unsqueeze(1)
        upper = torch.maximum(upper, lower + 1e-8)  # l = u = 0: avoid 0/0 (either slope is exact there)
        upper_slope = upper / (upper - lower)       # 1 for active, 0 for dead, u/(u-l) for unstable
        upper_offset = -lower * upper_slope
        lower_slope = (upper_slope > 0.5).to(coeff.dtype)  # slope 1 iff u > -l (adaptive)
        positive, negative = coeff.clamp(min=0), coeff.clamp(max=0)
        constant = (negative * upper_offset).flatten(2).sum(dim=2)
        return positive * lower_slope + negative * upper_slope, constant


class _Flatten:
    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> Box:
        return lower.flatten(1), upper.flatten(1)

    def backward(self, coeff: torch.Tensor, entering: Box) -> Tuple[torch.Tensor, torch.Tensor]:
        return coeff.view(*coeff.shape[:2], *entering[0].shape[1:]), coeff.new_zeros(coeff.shape[:2])


class _Normalize:
    """(x - mean) / std per channel: increasing and affine, so its interval image is exact."""

    def __init__(self, module: nn.Module):
        self.module = module

    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> Box:
        return self.module(lower), self.module(upper)

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
    raise UserError(f"IBP/CROWN-IBP bounds: unsupported module {name!r} ({module!r}); they need an nn.Sequential "
                    f"of Conv2d (zero padding), Linear, ReLU, Flatten, e.g. cifar_model or cifar_model_large")


def bound_steps(model: nn.Module) -> List:
    """The model as a list of bound-propagating steps; a one-line UserError names the first unsupported module."""
    if not isinstance(model, nn.Sequential):
        raise UserError(f"IBP/CROWN-IBP bounds need an nn.Sequential model (e.g. cifar_model), "
                        f"got {type(model).__name__}")
    steps = [_step(name, module) for name, module in _leaves(model)]
    if not steps:
        raise UserError("IBP/CROWN-IBP bounds: the model has no layers")
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


def margin_lower_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str = IBP,
                        beta: float = 1.0, clip_min: float = 0.0, clip_max: float = 1.0) -> torch.Tensor:
    """Lower bounds of z_y - z_j over the eps-ball for every class j: [B, K], column y exactly 0.

    method 'ibp': IBP. 'crown-ibp': beta * CROWN-IBP + (1 - beta) * IBP (Zhang et al.; Hydra's mix), the
    CROWN pass skipped when beta == 0. Both are valid bounds, so any mix in [0, 1] is too; neither is
    always the tighter one, which is why the mix is ramped. Differentiable in the weights (and the scores
    and rates of masked layers in learn mode).
    """
    if method not in METHODS:
        raise UserError(f"unknown bound method {method!r}; choose one of: {', '.join(METHODS)}")
    if not 0.0 <= beta <= 1.0:
        raise UserError(f"CROWN-IBP beta must be in [0, 1], got {beta}")
    steps = bound_steps(model)
    boxes = _propagate(steps, input_box(x, eps, clip_min, clip_max))
    spec = margin_specification(y, boxes[-1][0].shape[1], x.dtype)
    margins = _ibp_margins(steps, boxes, spec)
    if method == CROWN_IBP and beta > 0:
        margins = beta * _crown_margins(steps, boxes, spec) + (1 - beta) * margins
    return margins


def crown_ibp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, beta: float,
                   clip_min: float = 0.0, clip_max: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hydra's `crown-ibp` objective: CE(-m, y) with m = beta * CROWN-IBP + (1 - beta) * IBP margin bounds.

    Hydra's loss is this robust term only (its clean CE is logged, not optimised). Returns (loss, -m): the
    "worst-case logits", whose argmax is y exactly when the point is verified, so the trainer's accuracy
    on them is the verified training accuracy and no extra clean forward is needed.
    """
    worst_logits = -margin_lower_bounds(model, x, y, eps, CROWN_IBP, beta, clip_min, clip_max)
    return F.cross_entropy(worst_logits, y), worst_logits


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
    """Percent of points verified robust at Linf eps (Hydra's evaluation: naive IBP, method='ibp')."""
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
