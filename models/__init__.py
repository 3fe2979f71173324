"""Layer 2: dense architectures, registered by name and built with `create_model`.

Models are plain `nn.Conv2d`/`nn.Linear`/`nn.BatchNorm2d` networks; `pruning/` swaps in masked layers later.
Every model takes raw [0, 1] images and applies `self.normalize` first (identity unless normalize=True).
"""
import importlib
import inspect
import logging
from typing import List, Optional, Sequence

from torch import nn

from configs.errors import UserError
from models.common import InputNormalize
from utils.registry import Registry

__all__ = ["MODELS", "register_model", "create_model", "list_models"]

_logger = logging.getLogger(__name__)

MODELS = Registry("architecture")
register_model = MODELS.register

# Imported lazily (they import `register_model` from here); importing registers their builders.
_ARCHITECTURE_MODULES = ("vgg", "resnet_cifar", "wrn", "resnet_imagenet", "small_cnn", "hydra_cnn")


def _register_architectures() -> None:
    for module in _ARCHITECTURE_MODULES:
        importlib.import_module(f"{__name__}.{module}")


def list_models() -> List[str]:
    """Sorted names of every registered architecture."""
    _register_architectures()
    return MODELS.names()


def create_model(name: str, *, num_classes: int, in_channels: int = 3, normalize: bool = False,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 init_type: str = "kaiming_normal", input_size: Optional[int] = None) -> nn.Module:
    """Builds the dense architecture `name`.

    Args:
        name: registered architecture name (unknown names raise UserError listing the choices).
        num_classes: size of the last linear layer.
        in_channels: channels of the input images (first conv).
        normalize: compute (x - mean) / std inside the model; mean and std are then required, one value
            per input channel. They live in non-persistent buffers, so state-dict keys do not change.
        mean, std: per-channel statistics, ignored unless normalize is True.
        init_type: weight init; vgg16_bn also accepts kaiming_uniform and signed_const.
        input_size: side of the square input in pixels, for the builders whose layer sizes depend on it
            (Hydra's cifar_model*: a builder with an `input_size` parameter); ignored by the others.
    """
    _register_architectures()
    builder = MODELS.get(name)
    if num_classes < 1 or in_channels < 1:
        raise UserError(f"{name}: num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
    norm_module = None
    if normalize:
        if mean is None or std is None:
            raise UserError(f"{name}: normalize=True needs both mean and std ({in_channels} values each)")
        if len(mean) != in_channels or len(std) != in_channels:
            raise UserError(f"{name}: normalize needs {in_channels} mean and std values (one per input channel), "
                            f"got {len(mean)} and {len(std)}")
        norm_module = InputNormalize(mean, std)
    elif mean is not None or std is not None:
        _logger.debug("%s: mean/std given without normalize=True; they are ignored", name)
    takes_size = input_size is not None and "input_size" in inspect.signature(builder).parameters
    sized = {"input_size": input_size} if takes_size else {}
    model = builder(num_classes=num_classes, in_channels=in_channels, init_type=init_type, normalize=norm_module,
                    **sized)
    _logger.debug("built %s with %d parameters", name, sum(p.numel() for p in model.parameters()))
    return model
