"""Non-finite losses, handled on the device: a step whose accumulation window saw a non-finite loss on any
rank is applied with zero effect, without the host waiting for the device.

The window's flag (an all-reduced MAX over ranks) goes to the optimizer as `found_inf`, the argument PyTorch's
fused optimizers take from its GradScaler: the fused SGD / AdamW step then leaves the weights, the momentum
and Adam moments and Adam's step count as they were, on the device. The counters (skipped steps in all, the
longest run of them in a row) stay on the device too; the host reads them with the metrics of a log row and
before every checkpoint, and aborts there when train.max_nonfinite is reached.
"""
from typing import Optional

import torch
import torch.distributed as dist


class StepHealth:
    def __init__(self, device, skipped: int = 0):
        zero = torch.zeros((), device=device)
        self.window_bad: Optional[torch.Tensor] = None   # any non-finite loss in the open window (bool)
        self.skipped, self.in_row, self.worst_in_row = zero + skipped, zero.clone(), zero.clone()

    def observe(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach().float())
        self.window_bad = bad if self.window_bad is None else self.window_bad | bad

    def close_window(self) -> torch.Tensor:
        """found_inf for the optimizer step that ends the window: 1.0 when any rank saw a non-finite loss."""
        found = self.window_bad.float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)  # queued on the device: no host wait
        self.window_bad = None
        self.skipped += found
        self.in_row = (self.in_row + found) * found
        self.worst_in_row = torch.maximum(self.worst_in_row, self.in_row)
        return found

    def read(self) -> tuple:
        """(skipped steps in all, the longest run in a row so far): a host sync, for log rows and saves."""
        skipped, worst = torch.stack([self.skipped, self.worst_in_row]).tolist()
        return int(skipped), int(worst)


def apply_found_inf(optimizer, found_inf: torch.Tensor) -> None:
    """Hand the flag to a fused torch optimizer (its step is then skipped on the device when it is 1)."""
    optimizer.grad_scale = None
    optimizer.found_inf = found_inf
