"""Which kernel rows `hcd bench` measures on this machine: (kind, shape, dtype, mode, backends) tuples.

kind: "head" (one stage's hcd_head_loss), "student" (student_loss), "loss" (hcd_loss: LOSS_STAGES heads of the
shape + the student terms, forward + backward: the row issue 14's whole-loss targets are read from)."""
import os
from typing import List, Optional

import torch

from hcd.engine.bench.shapes import CPU_SHAPES, INTERPRETER_SHAPE, STUDENT_SHAPES, gpu_head_shapes, headline_shape

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("forward", "backward", "full")


def kernel_plan(device, quick, dtypes: Optional[List[str]] = None, ns: Optional[List[int]] = None):
    """(kind, shape, dtype, mode, backends) for every row that fits this machine; dtypes / ns (CUDA) keep
    only those dtypes / those n of the head (a GPU plan in parts, each within one call's time limit).
    backends None means every backend of the device (kernel_rows.backends_for)."""
    if device.type == "cuda":
        return _cuda_plan(quick, dtypes, ns)
    plan = []
    shapes = CPU_SHAPES[:1] if quick else CPU_SHAPES
    for shape in shapes:
        for mode in (("full",) if quick else MODES):
            plan.append(("head", shape, "fp32", mode, ["eager", "compile"]))
    plan.append(("loss", CPU_SHAPES[0], "fp32", "full", ["eager", "compile"]))
    plan.append(("student", STUDENT_SHAPES[-1], "fp32", "full", ["eager", "compile"]))
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter is slow: one tiny shape, numerics only
        # (the whole loss, S = 4 stages, takes ~10 s a call there: left out of --quick)
        plan += [(kind, INTERPRETER_SHAPE, "fp32", "full", ["eager", "triton"])
                 for kind in ("head",) + (() if quick else ("loss",))]
    return plan


def _cuda_plan(quick, dtypes, ns):
    shapes = gpu_head_shapes(ns or ((4,) if quick else (2, 4, 8)), quick=quick)
    # the headline shape first, then the rest by size: a run cut short by a time limit has measured it
    first = headline_shape()
    shapes = sorted(shapes, key=lambda s: (s != first, -s.B * s.C, s.n != 4, s.n, -s.Dp, -s.Dt))
    dts = [d for d in (("bf16", "fp32") if quick and dtypes is None else ("bf16", "fp16", "fp32"))
           if dtypes is None or d in dtypes]
    # per shape and dtype the whole loss (full: the targets are forward + backward) before the head's modes
    plan = [row for shape in shapes for dt in dts
            for row in [("loss", shape, dt, "full", None)] + [("head", shape, dt, mode, None) for mode in MODES]]
    plan += [("student", shape, dt, "full", None) for shape in STUDENT_SHAPES for dt in dts]
    return plan
