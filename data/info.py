"""Static facts about each dataset: canonical names, class counts, input shape, normalisation constants, and the
evaluation policy that follows from them (balanced accuracy, AutoAttack's batch of survivors)."""
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

from configs.errors import UserError

DEFAULT_IMAGENET_DIM = 224
AUTOATTACK_GPU_BATCH = 1000
AUTOATTACK_GPU_MAX_SIDE = 64  # larger images (ImageNet) keep the evaluation batch: 1000 of them may not fit


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its input.

    ``mean``/``std`` are per channel and used only for in-model normalisation (``--normalize``); batches
    themselves are always raw pixels in [0, 1].
    """

    name: str  # canonical name: 'CIFAR10', 'CIFAR100', 'SVHN', 'MNIST', 'imagenet', 'digits'
    num_classes: int
    in_channels: int
    image_size: int  # side of the square model input
    mean: tuple
    std: tuple
    balanced_accuracy: bool = False  # evaluations and tables also report balanced accuracy (SVHN, as the paper)

    def autoattack_batch_size(self, on_gpu: bool, fallback: int) -> int:
        """Survivors per AutoAttack batch: official AutoAttack's 1000 on a GPU for images up to
        AUTOATTACK_GPU_MAX_SIDE pixels (Square's sequential queries want large batches), else `fallback` (the
        evaluation batch)."""
        return AUTOATTACK_GPU_BATCH if on_gpu and self.image_size <= AUTOATTACK_GPU_MAX_SIDE else fallback


# Order is the order of dataset_names() and of the choices listed in error messages.
_INFOS: Dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("CIFAR10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        DatasetInfo("CIFAR100", 100, 3, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
        DatasetInfo(
            "SVHN", 10, 3, 32,
            (0.43090966, 0.4302428, 0.44634357), (0.19759192, 0.20029082, 0.19811132), balanced_accuracy=True,
        ),
        DatasetInfo("MNIST", 10, 1, 28, (0.1307,), (0.3081,)),
        # num_classes is the ILSVRC-2012 count; a built source reports the class folders it found.
        DatasetInfo("imagenet", 1000, 3, DEFAULT_IMAGENET_DIM, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        # Measured once on the fixed 1,437-image training split, after the uint8 quantisation the
        # source applies (round(v * 255 / 16) / 255): mean 0.30543, std 0.37596.
        DatasetInfo("digits", 10, 1, 8, (0.3054,), (0.3760,)),
    )
}

# Datasets whose input side can be chosen (image_dim); every other one has a fixed native size.
_RESIZABLE = {"imagenet"}


def dataset_names() -> List[str]:
    """The canonical dataset names, in a fixed order."""
    return list(_INFOS)


def canonical_dataset_name(name: str) -> str:
    """Case-insensitive lookup: 'cifar10' -> 'CIFAR10', 'ImageNet' -> 'imagenet'."""
    key = str(name).strip().lower()
    for canonical in _INFOS:
        if canonical.lower() == key:
            return canonical
    raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(_INFOS)}")


def dataset_info(name: str, image_dim: Optional[int] = None) -> DatasetInfo:
    """Static facts about a dataset; reads no files.

    ``image_dim`` sets the input side of ImageNet (default 224). The other datasets have a fixed size;
    an ``image_dim`` that differs from it is an error rather than being silently ignored.
    """
    info = _INFOS[canonical_dataset_name(name)]
    if image_dim is None:
        return info
    image_dim = int(image_dim)
    if info.name in _RESIZABLE:
        if image_dim <= 0:
            raise UserError(f"image_dim must be a positive number of pixels, got {image_dim}")
        return replace(info, image_size=image_dim)
    if image_dim != info.image_size:
        raise UserError(
            f"image_dim {image_dim} does not apply to {info.name}, whose images are "
            f"{info.image_size}x{info.image_size}; leave image_dim unset (it is used only for imagenet)"
        )
    return info
