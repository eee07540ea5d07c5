"""Non-finite losses, handled on the device: a step whose accumulation window saw a non-finite loss on any
rank is applied with zero effect, without the host waiting for the device.

The window's flag (an all-reduced MAX over ranks) goes to the optimizer as `found_inf`, the argument PyTorch's
fused optimizers take from its GradScaler: the fused SGD / AdamW step then leaves the weights, the momentum
and Adam moments and Adam's step count as they were, on the device. The counters (skipped steps in all, the
longest run of them in a row) stay on the device too; the host reads them with the metrics of a log row and
before every checkpoint, and aborts there when train.max_nonfinite is reached.

With train.precision fp16 (autocast, ZeRO-0) DeepSpeed steps the optimizer through a torch GradScaler, which
hands the fused step its own found_inf (non-finite gradients): guard_scaler makes that flag include the
window's, so a non-finite loss is still never applied (and lowers the loss scale, as non-finite gradients
do). The scaler's state is not in DeepSpeed's checkpoint: scaler_state / load_scaler_state carry it.
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
    optimizer.__dict__.pop("grad_scale", None)  # no unscaling (a GradScaler, fp16, sets its own: a number)
    optimizer.found_inf = found_inf


def guard_scaler(scaler) -> None:
    """Make a torch GradScaler's found_inf also hold the flag apply_found_inf left on the optimizer (the
    scaler computes its own in _unscale_grads_, then replaces the optimizer's found_inf with it)."""
    unscale = scaler._unscale_grads_

    def _unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16):
        per_device = unscale(optimizer, inv_scale, found_inf, allow_fp16)
        ours = getattr(optimizer, "found_inf", None)
        if ours is not None:
            for t in per_device.values():
                t.copy_(torch.maximum(t, ours.to(t.device, t.dtype)))
        return per_device
    scaler._unscale_grads_ = _unscale_grads_


def scaler_state(engine) -> dict:
    """The fp16 loss scaler's state for a checkpoint's client state ({} without one)."""
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    return {"grad_scaler": scaler.state_dict()} if scaler is not None else {}


def load_scaler_state(engine, saved: dict) -> None:
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is not None and saved.get("grad_scaler"):
        scaler.load_state_dict(saved["grad_scaler"])
