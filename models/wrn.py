"""Pre-activation WideResNets (Zagoruyko & Komodakis) with the module names of HARP's `models/wrn_cifar.py`."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models import register_model
from models.common import init_bn_, init_conv_, normalize_or_identity, require_default_init


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; a 1x1 `convShortcut` only when the width changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        # An absent shortcut must not appear as a module at all, so the key set matches the original checkpoints.
        self.convShortcut: Optional[nn.Conv2d] = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.equal_in_out:
            out = self.conv1(self.relu1(self.bn1(x)))
            shortcut = x
        else:
            # The pre-activated tensor feeds both conv1 and convShortcut (one object: the residual-tie detector
            # in pruning relies on it).
            x = self.relu1(self.bn1(x))
            out = self.conv1(x)
            shortcut = self.convShortcut(x)
        out = self.conv2(self.relu2(self.bn2(out)))
        return shortcut + out


class NetworkBlock(nn.Module):
    """A group of blocks kept under `.layer` so the state-dict keys read `blockN.layer.i.*` as in the original."""

    def __init__(self, n_blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(n_blocks)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs, dropout 0, as used by HARP (`wrn_28_4`) and robust-training papers."""

    def __init__(self, depth: int, widen_factor: int, *, num_classes: int, in_channels: int = 3,
                 normalize: Optional[nn.Module] = None):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n_blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = normalize_or_identity(normalize)
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n_blocks, widths[0], widths[1], stride=1)
        self.block2 = NetworkBlock(n_blocks, widths[1], widths[2], stride=2)
        self.block3 = NetworkBlock(n_blocks, widths[2], widths[3], stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # N(0, sqrt(2 / (k*k*C_out))) of the original is Kaiming-normal with fan_out.
                init_conv_(m)
            elif isinstance(m, nn.BatchNorm2d):
                init_bn_(m)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        # Global pooling equals the original avg_pool2d(8) at 32x32 and also accepts other input sizes.
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


def _wrn(arch: str, depth: int, widen_factor: int, num_classes: int, in_channels: int, init_type: str,
         normalize: Optional[nn.Module]) -> WideResNet:
    require_default_init(arch, init_type)
    return WideResNet(depth, widen_factor, num_classes=num_classes, in_channels=in_channels, normalize=normalize)


@register_model("wrn_28_4")
def wrn_28_4(*, num_classes: int, in_channels: int = 3, init_type: str = "kaiming_normal",
             normalize: Optional[nn.Module] = None) -> WideResNet:
    """WRN-28-4, pre-activation (HARP `wrn_cifar.py` layout, 29 prunable layers)."""
    return _wrn("wrn_28_4", 28, 4, num_classes, in_channels, init_type, normalize)


@register_model("wrn_28_10")
def wrn_28_10(*, num_classes: int, in_channels: int = 3, init_type: str = "kaiming_normal",
              normalize: Optional[nn.Module] = None) -> WideResNet:
    """WRN-28-10, pre-activation (HARP `wrn_cifar.py` layout)."""
    return _wrn("wrn_28_10", 28, 10, num_classes, in_channels, init_type, normalize)


@register_model("wrn_34_10")
def wrn_34_10(*, num_classes: int, in_channels: int = 3, init_type: str = "kaiming_normal",
              normalize: Optional[nn.Module] = None) -> WideResNet:
    """WRN-34-10, pre-activation (HARP `wrn_cifar.py` layout; the Madry/TRADES robustness benchmark net)."""
    return _wrn("wrn_34_10", 34, 10, num_classes, in_channels, init_type, normalize)
