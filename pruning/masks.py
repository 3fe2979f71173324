"""The one mask implementation: how many entries a keep rate keeps, and which ones.

Counting rules are the original HARP code's (GetSubnet), so masks match HARP checkpoints element for element:
- weight granularity keeps n - floor((1 - k) * n) entries, computed in float32;
- channel granularity keeps round(k * C_in) input channels (half to even), and never fewer than one
  (the original could zero a whole layer, e.g. RGB input at k < 1/6, which disconnects the network).
"""
import numpy as np
import torch


def kept_weight_count(keep: float, numel: int) -> int:
    drop = int(np.float32(np.float32(1.0) - np.float32(keep)) * np.float32(numel))
    return numel - min(max(drop, 0), numel)


def kept_channel_count(keep: float, channels: int) -> int:
    return int(min(max(round(float(np.float32(keep) * np.float32(channels))), 1), channels))


_SAMPLE = 1 << 16  # elements sampled to bracket the k-th value; below this size kthvalue runs directly


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th smallest (1-based) entry of a 1-D tensor, as torch.kthvalue gives it.

    kthvalue is one sequential selection per tensor, the slowest part of a mask refresh (harp_prune's step on
    vgg16_bn spent 0.16 s in it). Here a strided sample brackets the k-th value, one parallel pass counts the
    entries below the bracket, and kthvalue runs only on the few entries inside it. If the bracket misses
    (an unlucky sample), the plain kthvalue answers.
    """
    n = values.numel()
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(values, k).values
    sample = values[:: n // _SAMPLE]
    m = sample.numel()
    q = k / n
    margin = 6.0 * (q * (1 - q) / m) ** 0.5 + 8.0 / m  # six standard deviations of a sample quantile
    low = torch.kthvalue(sample, max(1, int((q - margin) * m))).values
    high = torch.kthvalue(sample, min(m, int((q + margin) * m) + 1)).values
    below = int((values < low).sum())
    inside = values[(values >= low) & (values <= high)]
    if below < k <= below + inside.numel():
        return torch.kthvalue(inside, k - below).values
    return torch.kthvalue(values, k).values


def top_mask(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """0/1 mask (scores' dtype and shape) keeping the `kept` entries of largest |score|, ties broken by index.

    Uses a k-th-value threshold (no full sort); only when ties at the threshold would change the count
    does it fall back to an exact top-k.
    """
    flat = scores.detach().abs().flatten()
    n = flat.numel()
    if kept >= n:
        return torch.ones_like(scores)
    if kept <= 0:
        return torch.zeros_like(scores)
    threshold = kth_smallest(flat.float(), n - kept)
    mask = flat > threshold
    if int(mask.sum()) != kept:
        mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
        mask[torch.topk(flat.float(), kept, sorted=False).indices] = True
    return mask.view_as(scores).to(scores.dtype)


def channel_top_mask(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Mask of the channel-score tensor ([1, C, 1, 1] or [1, C]) keeping the `kept` largest channels."""
    return top_mask(scores.reshape(-1), kept).view_as(scores)
