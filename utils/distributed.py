"""Multi-process training with PyTorch's DistributedDataParallel under torchrun (one process per device).

torchrun (or SLURM through scripts/slurm_harp.sbatch) sets RANK, WORLD_SIZE and LOCAL_RANK; the entry
point passes its environment here, so library code never reads os.environ itself.
"""
from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

import torch
import torch.distributed as dist

from configs.errors import UserError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(env: Mapping[str, str], device: torch.device) -> Tuple[DistContext, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs.

    Returns the context and this process's device: under torchrun each process drives the GPU of its local
    rank, selected before the group is created so NCCL binds to it.
    """
    world_size = int(env.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(), device
    ctx = DistContext(int(env["RANK"]), world_size, int(env.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {ctx.local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(ctx.local_rank)
        device = torch.device("cuda", ctx.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ctx, device


def all_reduce_sums(values: Dict[str, float], ctx: DistContext, device: torch.device) -> Dict[str, float]:
    """Sum a dict of numbers over all processes (identity without torchrun)."""
    if not ctx.enabled:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def broadcast_flag(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """Rank 0's decision for everyone (e.g. whether a fatal condition was hit)."""
    if not ctx.enabled:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
