"""Checkpoint files: atomic writes, safe loads, and the key-prefix cleanup that old checkpoints need."""
import os
import pickle
import re
import tempfile
import zipfile
from typing import Any, Dict, Mapping

import torch

from configs.errors import UserError

FORMAT_VERSION = 1
# Prefixes that wrappers add to parameter names: DataParallel/DDP, Hydra's basic_model, torch.compile.
_WRAPPER_PREFIXES = ("module.basic_model.", "module.", "_orig_mod.")


def save_atomic(obj: Any, path: str) -> None:
    """Write to a temporary file in the same directory, then rename: a crash never leaves half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pth.tar")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load with `weights_only=True`; a missing, unreadable or foreign file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise UserError(f"cannot read checkpoint {path}: {_reason(err)}") from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dict or state_dict")
    return obj


def _reason(err: Exception) -> str:
    """One readable line from torch.load's multi-paragraph errors."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if "Unsupported global" in line:
            return line.split(" Please use")[0] + " (not a plain weights checkpoint)"
    return lines[0] if lines else type(err).__name__


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
