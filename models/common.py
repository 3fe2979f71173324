"""Pieces shared by the architectures: in-model input normalisation and weight initialisation."""
import math
from typing import Optional, Sequence

import torch
from torch import nn

from configs.errors import UserError

DEFAULT_INIT = "kaiming_normal"
VGG_INIT_TYPES = ("kaiming_normal", "kaiming_uniform", "signed_const")


class InputNormalize(nn.Module):
    """Computes ``(x - mean) / std`` per channel inside the model, so attacks still work on [0, 1] images."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel():
            raise UserError(f"normalize: mean has {mean_t.numel()} values but std has {std_t.numel()}")
        if bool((std_t <= 0).any()):
            raise UserError(f"normalize: every std must be positive, got {std_t.tolist()}")
        # Buffers (unlike the original's plain attributes) follow .to(device); non-persistent so that
        # checkpoints keep exactly the keys of the plain benchmark models.
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def normalize_or_identity(normalize: Optional[nn.Module]) -> nn.Module:
    return nn.Identity() if normalize is None else normalize


def require_default_init(arch: str, init_type: str) -> None:
    """The original code only implements Kaiming-normal for everything but VGG; refuse the rest loudly."""
    if init_type != DEFAULT_INIT:
        raise UserError(f"{arch} supports only init_type {DEFAULT_INIT!r}, got {init_type!r}")


def init_conv_(conv: nn.Conv2d, init_type: str = DEFAULT_INIT) -> None:
    """Kaiming (fan_out, ReLU) init of a conv weight, or one of the VGG variants of the original code."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if init_type == "kaiming_uniform":
        nn.init.kaiming_uniform_(conv.weight, mode="fan_out", nonlinearity="relu")
    elif init_type == "signed_const":
        # Signed Kaiming constant (Ramanujan et al.): the magnitude uses fan_in, as the original code does.
        fan_in = conv.weight[0].numel()
        with torch.no_grad():
            conv.weight.copy_(conv.weight.sign() * math.sqrt(2.0 / fan_in))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def init_bn_(bn: nn.BatchNorm2d) -> None:
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
