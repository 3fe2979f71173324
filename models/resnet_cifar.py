"""ResNet18 for 32x32 inputs in the kuangliu/pytorch-cifar layout used by Hydra, HARP and the AP benchmark."""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models import register_model
from models.common import normalize_or_identity, require_default_init


class BasicBlock(nn.Module):
    """Two 3x3 convs with a projection shortcut (1x1 conv + BN) only where the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        # Registration order conv1, bn1, conv2, bn2, shortcut fixes the order of the 21-entry strategy lists.
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # conv1 and shortcut receive the very same tensor object: channel pruning finds residual ties that way.
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """kuangliu CIFAR ResNet: 3x3 stride-1 stem without max-pool, four stages, global average pool, `linear`."""

    def __init__(self, num_blocks: List[int], *, num_classes: int, in_channels: int = 3,
                 normalize: Optional[nn.Module] = None):
        super().__init__()
        self.normalize = normalize_or_identity(normalize)
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * BasicBlock.expansion, num_classes)
        # No custom init: the original resnet18 keeps PyTorch's defaults.

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Global pooling equals the original avg_pool2d(4) at 32x32 and also accepts other input sizes.
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


@register_model("resnet18")
def resnet18(*, num_classes: int, in_channels: int = 3, init_type: str = "kaiming_normal",
             normalize: Optional[nn.Module] = None) -> CifarResNet:
    """ResNet18 for 32x32 inputs (kuangliu CIFAR layout; keys equal the AP benchmark's base_resnet18)."""
    require_default_init("resnet18", init_type)
    return CifarResNet([2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, normalize=normalize)
