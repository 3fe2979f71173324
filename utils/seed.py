"""Seeding. Every epoch reseeds from (seed, epoch), so a resumed run replays exactly the same randomness."""
import random
from typing import Any, Dict

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible seed per epoch (large odd multiplier keeps neighbours apart)."""
    return (seed * 1_000_003 + epoch * 7919 + 17) % 2**63


def rng_state() -> Dict[str, Any]:
    """RNG states in types that `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state
