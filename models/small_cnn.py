"""A small CNN of this toolkit (not from a paper) for 8x8 digits and 28x28 MNIST, cheap enough for CPU runs."""
from typing import List, Optional

import torch
from torch import nn

from models import register_model
from models.common import init_bn_, init_conv_, normalize_or_identity, require_default_init

WIDTHS = (64, 128, 256)
STRIDES = (1, 2, 2)
HIDDEN = 256


class SmallCNN(nn.Module):
    """Three conv3x3-BN-ReLU blocks, 2x2 adaptive average pool, two-layer MLP head (VGG-style names)."""

    def __init__(self, *, num_classes: int, in_channels: int = 3, width: float = 1.0,
                 normalize: Optional[nn.Module] = None):
        super().__init__()
        if width <= 0:
            raise ValueError(f"small_cnn width must be positive, got {width}")
        widths = [max(1, round(w * width)) for w in WIDTHS]
        hidden = max(1, round(HIDDEN * width))
        self.normalize = normalize_or_identity(normalize)
        layers: List[nn.Module] = []
        channels = in_channels
        for w, s in zip(widths, STRIDES):
            layers += [nn.Conv2d(channels, w, kernel_size=3, stride=s, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True)]
            channels = w
        self.features = nn.Sequential(*layers)
        # A fixed 2x2 map keeps the classifier's size independent of the input size (8x8 digits, 28x28 MNIST).
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 2 * 2, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_conv_(m)
            elif isinstance(m, nn.BatchNorm2d):
                init_bn_(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("small_cnn")
def small_cnn(*, num_classes: int, in_channels: int = 3, init_type: str = "kaiming_normal",
              normalize: Optional[nn.Module] = None, width: float = 1.0) -> SmallCNN:
    """Small VGG-style CNN of this toolkit (no paper layout) for digits/MNIST; `width` scales every layer."""
    require_default_init("small_cnn", init_type)
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width, normalize=normalize)
