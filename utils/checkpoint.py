"""Checkpoint files: atomic writes, safe loads, and the key-prefix cleanup that old checkpoints need."""
import os
import re
from typing import Any, Dict, Mapping

import numpy as np
import torch

from configs.errors import UserError
from utils.atomic import atomic_write

FORMAT_VERSION = 1
# Prefixes that wrappers add to parameter names: DataParallel/DDP, Hydra's basic_model, torch.compile.
_WRAPPER_PREFIXES = ("module.basic_model.", "module.", "_orig_mod.")


def save_atomic(obj: Any, path: str) -> None:
    """torch.save through utils.atomic: a crash never leaves half a checkpoint."""
    atomic_write(path, lambda fh: torch.save(obj, fh), binary=True)


def _numpy_scalar_globals() -> list:
    """What a checkpoint of the original HARP/Hydra code needs beyond tensors: numpy scalars (its optimizer state
    holds the cosine lr as a numpy float, and best_prec1 may be one) and their dtypes. Nothing that can run code.
    numpy 1 pickles the scalar constructor as numpy.core.multiarray.scalar, numpy 2 as numpy._core.multiarray."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                         np.uint32, np.uint64, np.float16, np.float32, np.float64)]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype] + dtypes


_NUMPY_SCALARS = _numpy_scalar_globals()


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load with `weights_only=True` (plus numpy scalars); a missing, unreadable or foreign file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_NUMPY_SCALARS):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # any failure to unpickle a file is the file's problem, not the program's
        raise UserError(f"cannot read checkpoint {path}: {_reason(err)}") from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dict or state_dict")
    return obj


def _reason(err: Exception) -> str:
    """One line for torch.load's multi-paragraph errors, without its advice to load unsafely: a file holding
    objects other than tensors and numbers is refused; anything else is not a readable checkpoint."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    refused = re.search(r"(Unsupported global: GLOBAL [\w.]+|unsupported GLOBAL [\w.]+|but got <class '[\w.]+'>)", text)
    if refused:
        return f"it holds objects other than tensors and numbers ({refused.group(1)}); refused"
    return f"not a readable checkpoint file ({type(err).__name__})"


def state_dict_of(ckpt: Mapping[str, Any], path: str) -> Dict[str, torch.Tensor]:
    """The model weights inside a checkpoint (ours, HARP/Hydra's, the AP benchmark's, or a bare state_dict)."""
    for key in ("state_dict", "net", "model"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            return strip_wrapper_prefixes(ckpt[key])
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return strip_wrapper_prefixes(ckpt)
    raise UserError(f"checkpoint {path} has no model weights (no 'state_dict', 'net' or 'model' entry)")


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out
