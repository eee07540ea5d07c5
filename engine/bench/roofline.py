"""What the fused path should cost: FLOP and bytes per mode from the launch plan's cost model
(kernels/costs.py), the cards' peaks, and the achieved rates and roofline fraction derived from them."""
from typing import Optional

import torch

from hcd.kernels.costs import head_flops_bytes, loss_flops_bytes, student_flops_bytes
from hcd.kernels.testing import Case

# Dense peaks (TFLOP/s without sparsity; fp32 = non-tensor-core IEEE, what torch uses by default) and HBM GB/s.
ROOFLINES = {
    "H100": {"tflops": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0}, "gbps": 3350.0},
    "H200": {"tflops": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0}, "gbps": 4800.0},
    "A100": {"tflops": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0}, "gbps": 2039.0},
}

FORWARD_LAUNCHES = ("z_gemm", "row", "loss_sum")   # the fused forward (dLoss/dZ is computed in it)
BACKWARD_LAUNCHES = ("dx_gemm", "dw_gemm", "dz_scale", "dz_sum")  # dz_sum: hcd_loss's dz_scale


def _mode_cost(launches: dict, mode: str):
    names = {"forward": FORWARD_LAUNCHES, "backward": BACKWARD_LAUNCHES,
             "full": FORWARD_LAUNCHES + BACKWARD_LAUNCHES}[mode]
    picked = [launches[k] for k in names if k in launches]
    return sum(f for f, _ in picked), sum(b for _, b in picked)


def head_launch_costs(shape: Case, dtype_bytes: int) -> dict:
    """Per-launch (FLOP, bytes) of one stage's head at `shape`, from the fused launch plan's own model."""
    return head_flops_bytes(shape.B, shape.C, shape.n, shape.Dp, shape.Dt, dtype_bytes,
                            x_teacher_grad=not shape.frozen_teacher_feature)


def head_cost(shape: Case, dtype_bytes: int, mode: str):
    """(FLOP, bytes) of one stage's head in `mode`."""
    return _mode_cost(head_launch_costs(shape, dtype_bytes), mode)


def student_cost(B: int, C: int, dtype_bytes: int, mode: str):
    return _mode_cost(student_flops_bytes(B, C, dtype_bytes), mode)


def loss_cost(shape: Case, stages: int, dtype_bytes: int, mode: str):
    """(FLOP, bytes) of hcd_loss in `mode`: `stages` heads of `shape` and the student terms (teacher frozen)."""
    s = shape
    return _mode_cost(loss_flops_bytes(stages, s.B, s.C, s.n, s.Dp, s.Dt, dtype_bytes, bias=s.bias), mode)


def floor_ms(roof: Optional[dict], dtype_name: str, cost) -> Optional[float]:
    """The device-time floor of a (FLOP, bytes) cost on a card (roofline_seconds), in ms; None off the table."""
    return roofline_seconds(roof, dtype_name, *cost) * 1e3 if roof else None


def per_second(amount, ms, unit=1e12):
    """amount / time in `unit`s per second (TFLOP/s by default), None without a time."""
    return amount / (ms * 1e-3) / unit if ms else None


def roofline_for(device: torch.device) -> Optional[dict]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in ROOFLINES.items() if k in name), None)


def roofline_seconds(roof: dict, dtype_name: str, flops: float, nbytes: float) -> float:
    """The shortest time the card's peaks allow: compute- or memory-bound, whichever is longer."""
    return max(flops / (roof["tflops"][dtype_name] * 1e12), nbytes / (roof["gbps"] * 1e9))
