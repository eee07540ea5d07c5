"""BatchNorm statistics across ranks. Each rank's BatchNorm layers update their running mean and variance from
that rank's batches only, so without care the ranks evaluate with different statistics and a checkpoint or
export keeps rank 0's. train.dist_bn (OFA-KD's and timm's `dist_bn`) settles them before every evaluation,
checkpoint and export: "reduce" averages them over the ranks, "broadcast" copies rank 0's, "none" leaves
them. train.sync_bn instead normalises every training batch with statistics over all ranks
(torch.nn.SyncBatchNorm, CUDA only)."""
import torch
import torch.distributed as dist

from hcd.engine.config import ConfigError


def bn_buffers(module: torch.nn.Module) -> list:
    """The running statistics of every BatchNorm layer (timm's distribute_bn rule: buffers named running_*)."""
    return [b for name, b in module.named_buffers() if "running_mean" in name or "running_var" in name]


def distribute_bn(module: torch.nn.Module, mode: str, world: int) -> None:
    """Make every rank's BatchNorm statistics equal (collective: every rank calls it, in the same order)."""
    if world <= 1 or mode == "none":
        return
    if mode not in ("reduce", "broadcast"):
        raise ValueError(f"train.dist_bn: {mode!r} is not one of 'reduce', 'broadcast', 'none'")
    for b in bn_buffers(module):
        if mode == "broadcast":
            dist.broadcast(b, 0)
        else:
            total = b.float()  # a 16-bit buffer (bf16-pure runs) is summed in fp32
            dist.all_reduce(total)
            b.copy_(total / world)


def apply_sync_bn(distiller: torch.nn.Module, enabled: bool, device: torch.device, world: int) -> torch.nn.Module:
    """The distiller with SyncBatchNorm layers when train.sync_bn asks for them on several ranks (in place:
    parameter names, checkpoints and exports do not change)."""
    if not enabled:
        return distiller
    if device.type != "cuda":
        raise ConfigError("train.sync_bn: torch.nn.SyncBatchNorm runs on CUDA devices only; use train.dist_bn "
                          "(reduce, the default) to share BatchNorm statistics on this device")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(distiller) if world > 1 else distiller
