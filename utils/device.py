"""Choosing the torch device from --device / --gpu / --no-cuda."""
import torch

from configs.errors import UserError


def resolve_device(device: str = "auto", gpu: str = None, no_cuda: bool = False) -> torch.device:
    if no_cuda:
        return torch.device("cpu")
    if gpu:
        ids = [g.strip() for g in gpu.split(",") if g.strip()]
        device = f"cuda:{ids[0]}" if ids else device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"bad --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for a GPU but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev
