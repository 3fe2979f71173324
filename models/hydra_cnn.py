"""Hydra's small verifiable CNNs `cifar_model` and `cifar_model_large` (inspire-group/hydra, models/basic.py;
from Wong et al. 2018 / Zhang et al. CROWN-IBP), used with its MixTrain and CROWN-IBP trainers on SVHN.

Plain nn.Sequential of conv / ReLU / Flatten / linear (no BN, no pooling) so trainers/certify/bounds.py can bound
them. Layer indices and parameter names are Hydra's ('0.weight', '2.weight', '5.weight', '7.weight', ...),
so its checkpoints load.

Input size: Hydra's linear sizes (32*8*8, 64*8*8) are those of 32x32 inputs. Here the first linear layer's
width is computed from `input_size` (the side of the square input, default 32) by running the conv stack
on a zero image, so the same architecture serves 8x8 digits (32*2*2 and 64*2*2) and 28x28 MNIST (32*7*7:
Hydra's `mnist_model` layout). A mismatched input raises a UserError naming both sizes.

Normalisation: `normalize` (an InputNormalize) becomes the Sequential's first child, named 'normalize'
(nn.Identity when off). Its buffers are non-persistent, so the state-dict keys stay Hydra's, and
trainers/certify/bounds.py bounds (x - mean) / std exactly, so the bound computation is unaffected.
"""
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
from torch import nn

from configs.errors import UserError
from models import register_model
from models.common import init_conv_, normalize_or_identity, require_default_init

HYDRA_INPUT_SIZE = 32
# (out_channels, kernel, stride, padding) per conv; then the hidden linear widths (Hydra's models/basic.py).
CIFAR_MODEL = ((16, 4, 2, 1), (32, 4, 2, 1)), (100,)
CIFAR_MODEL_LARGE = ((32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)), (512, 512)


class HydraCNN(nn.Sequential):
    """conv-ReLU blocks, Flatten, linear-ReLU blocks, linear classifier; built for one input side."""

    def __init__(self, convs: Tuple, hidden: Tuple[int, ...], *, num_classes: int, in_channels: int,
                 input_size: int, normalize: Optional[nn.Module]):
        if input_size < 1:
            raise UserError(f"input_size must be a positive number of pixels, got {input_size}")
        layers: List[nn.Module] = []
        channels = in_channels
        for out_channels, kernel, stride, padding in convs:
            layers += [nn.Conv2d(channels, out_channels, kernel, stride=stride, padding=padding), nn.ReLU()]
            channels = out_channels
        features = _flat_size(layers, in_channels, input_size)
        layers.append(nn.Flatten())
        for width in hidden:
            layers += [nn.Linear(features, width), nn.ReLU()]
            features = width
        layers.append(nn.Linear(features, num_classes))
        children = [("normalize", normalize_or_identity(normalize))]
        children += [(str(i), layer) for i, layer in enumerate(layers)]
        super().__init__(OrderedDict(children))
        self.input_size = input_size
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_conv_(m)  # Hydra: N(0, 2 / (k*k*out_channels)) = Kaiming fan_out, zero bias; linear: torch default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise UserError(f"this model was built for {self.input_size}x{self.input_size} inputs but got "
                            f"{x.shape[-2]}x{x.shape[-1]}; build it with input_size={x.shape[-1]}")
        return super().forward(x)


def _flat_size(convs: List[nn.Module], in_channels: int, input_size: int) -> int:
    with torch.no_grad():
        out = nn.Sequential(*convs)(torch.zeros(1, in_channels, input_size, input_size))
    if out.numel() == 0:
        raise UserError(f"input_size {input_size} is too small for this model's convolutions")
    return out.numel()


@register_model("cifar_model")
def cifar_model(*, num_classes: int, in_channels: int = 3, init_type: str = "kaiming_normal",
                normalize: Optional[nn.Module] = None, input_size: int = HYDRA_INPUT_SIZE) -> HydraCNN:
    """Hydra's cifar_model: conv 16 and 32 (4x4, stride 2), linear 100, classifier (2 conv + 2 linear)."""
    require_default_init("cifar_model", init_type)
    convs, hidden = CIFAR_MODEL
    return HydraCNN(convs, hidden, num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                    normalize=normalize)


@register_model("cifar_model_large")
def cifar_model_large(*, num_classes: int, in_channels: int = 3, init_type: str = "kaiming_normal",
                      normalize: Optional[nn.Module] = None, input_size: int = HYDRA_INPUT_SIZE) -> HydraCNN:
    """Hydra's cifar_model_large: conv 32, 32, 64, 64 (3x3 s1 / 4x4 s2), linear 512, 512, classifier."""
    require_default_init("cifar_model_large", init_type)
    convs, hidden = CIFAR_MODEL_LARGE
    return HydraCNN(convs, hidden, num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                    normalize=normalize)
