"""VGG16 with batch norm for 32x32 inputs, in the layout of HARP/Hydra and the Adversarial Pruning benchmark."""
import math
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from configs.errors import UserError
from models import register_model
from models.common import VGG_INIT_TYPES, init_bn_, init_conv_, normalize_or_identity

# Only four pools: the last block keeps its 2x2 map, which is why the classifier takes 512*2*2 features.
VGG16_CFG: List[Union[int, str]] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


def _make_features(cfg: Sequence[Union[int, str]], in_channels: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    channels = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(v),
                       nn.ReLU(inplace=True)]
            channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """CIFAR VGG of HARP (`models/vgg_cifar.py`): conv-BN-ReLU features, 2x2 average pool, 3-layer MLP head."""

    def __init__(self, cfg: Sequence[Union[int, str]], *, num_classes: int, in_channels: int = 3,
                 init_type: str = "kaiming_normal", normalize: Optional[nn.Module] = None):
        super().__init__()
        self.normalize = normalize_or_identity(normalize)
        self.features = _make_features(cfg, in_channels)
        last_channels = [v for v in cfg if v != "M"][-1]
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(last_channels * 2 * 2, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )
        self._init_weights(init_type)

    def _init_weights(self, init_type: str) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_conv_(m, init_type)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
                if init_type == "signed_const":
                    # The original applies the signed constant to the linear layers too, with fan_in = in_features.
                    with torch.no_grad():
                        m.weight.copy_(m.weight.sign() * math.sqrt(2.0 / m.in_features))
            elif isinstance(m, nn.BatchNorm2d):
                init_bn_(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


@register_model("vgg16_bn")
def vgg16_bn(*, num_classes: int, in_channels: int = 3, init_type: str = "kaiming_normal",
             normalize: Optional[nn.Module] = None) -> VGG:
    """VGG16-bn for 32x32 inputs (HARP/Hydra CIFAR layout; keys equal the AP benchmark's base_vgg16)."""
    if init_type not in VGG_INIT_TYPES:
        raise UserError(f"vgg16_bn: unknown init_type {init_type!r}; choose one of: {', '.join(VGG_INIT_TYPES)}")
    return VGG(VGG16_CFG, num_classes=num_classes, in_channels=in_channels, init_type=init_type, normalize=normalize)
