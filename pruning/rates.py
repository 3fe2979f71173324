"""HARP's per-layer keep-rate parametrisation: k_l = sigmoid(r_l) * (1 - k_min) + k_min (the original HARP code's rate_act_func)."""
import math

import torch

# The original clipped u = (k - k_min)/(1 - k_min) to [-0.99, 0.99]: the upper bound keeps the logit finite
# (k = 1 maps to k ~ 0.99); its lower bound never acted, so k <= k_min gave NaN. We bound u below by 1e-6
# instead, which maps any start rate at or below k_min to k_min (+1e-6) without moving any rate above it.
U_MIN, U_MAX = 1e-6, 0.99


def keep_from_logit(logit: torch.Tensor, keep_min: float) -> torch.Tensor:
    return torch.sigmoid(logit) * (1.0 - keep_min) + keep_min


def logit_from_keep(keep: float, keep_min: float) -> float:
    """Inverse of `keep_from_logit`, with the clipping described above."""
    u = (keep - keep_min) / (1.0 - keep_min)
    u = min(max(u, U_MIN), U_MAX)
    return math.log(u / (1.0 - u))
