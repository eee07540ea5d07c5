"""One kernel row of `hcd bench`: a loss (one stage's HCD head, the student terms, or the whole loss of a
step: hcd_loss over LOSS_STAGES heads + the student) at one shape, dtype and mode, timed for each backend
(eager, torch.compile, the fused Triton path), with the fused path's achieved rates.

Inputs come from hcd.kernels.testing.make_inputs / make_loss_inputs: the generators the tests and `hcd verify`
use. A whole-loss row also holds its device-time floor (the cost model at the card's peaks) and the ratios
issue 14's targets read: fused device time over the floor, torch.compile's over the fused one.
"""
import contextlib
import gc
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from hcd.engine.bench.plan import DTYPES
from hcd.engine.bench.roofline import (floor_ms, head_cost, loss_cost, per_second, roofline_for, roofline_seconds,
                                       student_cost)
from hcd.engine.bench.shapes import configs_for, shape_dict
from hcd.engine.bench.timing import clear_grads, graph_ms, host_ms, time_ms, try_cuda
from hcd.kernels import HCDLossConfig, hcd_head_loss, hcd_loss, student_loss
from hcd.kernels.testing import Case, make_inputs, make_loss_inputs

LOSS_STAGES = 4  # a whole-loss row: the four stages of the shipped configs' students, and the student terms


def head_loss_fn(inp: dict, cfg: HCDLossConfig, backend: str) -> Callable[[], torch.Tensor]:
    return lambda: hcd_head_loss(inp["x_student"], inp["x_teacher"], inp["weight"], inp["bias"],
                                 inp["teacher_logits"], inp["student_logits"], inp["target"], cfg,
                                 backend=backend)[0]


def student_loss_fn(inp: dict, cfg: HCDLossConfig, backend: str) -> Callable[[], torch.Tensor]:
    return lambda: student_loss(inp["student_logits"], inp["teacher_logits"], inp["target"], cfg,
                                backend=backend)[0]


def whole_loss_fn(inp: dict, cfg: HCDLossConfig, backend: str) -> Callable[[], torch.Tensor]:
    """hcd_loss over make_loss_inputs's stacked stages; "compile" is torch.compile of the reference loss."""
    return lambda: hcd_loss(inp["x_students"], inp["x_teacher"], inp["weights"], inp["biases"],
                            inp["teacher_logits"], inp["student_logits"], inp["target"], cfg, backend=backend)[0]


def kind_inputs(kind: str, shape: Case, dtype, device) -> dict:
    if kind == "loss":
        return make_loss_inputs(shape, LOSS_STAGES, dtype, device)
    return make_inputs(shape, dtype, device)


def kind_cost(kind: str, shape: Case, dtype_bytes: int, mode: str):
    """(FLOP, bytes) of the fused path of a row's kind in `mode`."""
    if kind == "head":
        return head_cost(shape, dtype_bytes, mode)
    if kind == "loss":
        return loss_cost(shape, LOSS_STAGES, dtype_bytes, mode)
    return student_cost(shape.B, shape.C, dtype_bytes, mode)


def grad_tensors(inp: dict) -> List[torch.Tensor]:
    return [t for t in inp.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def mode_fn(loss_fn: Callable[[], torch.Tensor], mode: str):
    """The callable to time for a mode. backward times only the backward of a graph built once outside
    the timed region (retain_graph); full times forward + backward. The fused path computes dLoss/dZ inside
    its forward by design, so its "forward" already holds most of its gradient work: compare "full"."""
    if mode == "forward":
        return loss_fn
    if mode == "full":
        return lambda: loss_fn().backward()
    loss = loss_fn()
    return lambda: loss.backward(retain_graph=True)


def no_donated_buffers():
    """torch.compile's backward frees ("donates") its saved buffers, which forbids the retain_graph that
    the backward-only mode needs; the flag exists from torch 2.6 on."""
    from torch._functorch import config
    return config.patch(donated_buffer=False) if hasattr(config, "donated_buffer") else contextlib.nullcontext()


@contextlib.contextmanager
def tf32_matmul():
    """TF32 allowed for float32 matmuls (cuBLAS, and the GEMMs torch.compile generates), restored after:
    the fused path's backward GEMMs use TF32 dots, so the baselines are also timed with them allowed."""
    allow, precision = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = allow


def backends_for(device) -> List[str]:
    """Every baseline, and the fused path where it runs compiled (the interpreter only when a plan asks)."""
    return ["eager", "compile"] + (["triton"] if device.type == "cuda" else [])


def peak_mem_mb(fn, device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


@dataclass
class Measured:
    """Per backend: launch-inclusive ms, peak memory MB; CUDA only: host issue ms, graph-replay device ms
    and the reason a capture failed."""
    ms: Dict[str, float] = field(default_factory=dict)
    mem: Dict[str, Optional[float]] = field(default_factory=dict)
    host: Dict[str, float] = field(default_factory=dict)
    device: Dict[str, Optional[float]] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)


def measure(build: Callable[[str], Callable[[], object]], grads, device, backends, quick=False) -> Measured:
    """Time build(backend)() for every backend; build makes a fresh callable (graph_ms needs its own)."""
    m = Measured()
    for backend in backends:
        with no_donated_buffers():
            fn = build(backend)
            m.ms[backend] = time_ms(fn, device, grad_to_none=grads, quick=quick)
            m.mem[backend] = peak_mem_mb(fn, device)
            if device.type == "cuda":
                m.host[backend] = host_ms(fn, grads)
                del fn  # its retained graph would bind the inputs' grad accumulation to this stream
                gc.collect()
                m.device[backend], err = try_cuda(lambda: graph_ms(lambda: build(backend), grads))
                if err:
                    m.errors[backend] = err
        clear_grads(grads)
    return m


def bench_kernel_row(kind: str, shape: Case, dtype_name: str, mode: str, device, quick=False,
                     backends=None, fresh_compile=True) -> dict:
    """One table row: launch-inclusive medians per backend (and on CUDA: device time per backend from
    CUDA-graph replay, the fused call's host issue time), the fused path's TFLOP/s, GB/s and roofline
    fraction on both time bases, peak memory."""
    cfg = HCDLossConfig(n_sublogits=shape.n)
    inp = kind_inputs(kind, shape, DTYPES[dtype_name], device)
    make = {"head": head_loss_fn, "student": student_loss_fn, "loss": whole_loss_fn}[kind]
    if fresh_compile:
        torch._dynamo.reset()
    def build(backend):
        return mode_fn(make(inp, cfg, backend), mode)
    m = measure(build, grad_tensors(inp), device, backends or backends_for(device), quick)
    m_tf32 = None
    if device.type == "cuda" and dtype_name == "fp32":  # the baselines again, TF32 allowed (IEEE above)
        with tf32_matmul():
            m_tf32 = measure(build, grad_tensors(inp), device, ["eager", "compile"], quick)
    return kernel_row(kind, shape, dtype_name, mode, device, m, m_tf32)


def kernel_row(kind: str, shape: Case, dtype_name: str, mode: str, device, m: Measured,
               m_tf32: Optional[Measured] = None) -> dict:
    """The results JSON's row for measurements `m` (and, for fp32 on CUDA, `m_tf32`: the eager and compile
    baselines with TF32 allowed). Triton on CPU is the interpreter: no rate from it."""
    interp = device.type == "cpu" and "triton" in m.ms
    nbytes = torch.finfo(DTYPES[dtype_name]).bits // 8
    flops, moved = kind_cost(kind, shape, nbytes, mode)
    fused, fused_dev = m.ms.get("triton"), m.device.get("triton")
    row = {"kernel": kind, "shape": shape_dict(shape), "configs": configs_for(shape) if kind != "student" else [],
           "dtype": dtype_name, "mode": mode,
           "eager_ms": m.ms.get("eager"), "compile_ms": m.ms.get("compile"), "fused_ms": fused,
           "fused_tflops": per_second(flops, fused) if not interp else None,
           "fused_gbps": per_second(moved, fused, 1e9) if not interp else None,
           "peak_mem_mb": m.mem, "interpreter": interp}
    if device.type == "cuda":
        row.update({"host_ms": m.host, "device_ms": m.device, "device_errors": m.errors,
                    "device_tflops": per_second(flops, fused_dev), "device_gbps": per_second(moved, fused_dev, 1e9)})
    if m_tf32 is not None:
        row.update({"eager_tf32_ms": m_tf32.ms.get("eager"), "compile_tf32_ms": m_tf32.ms.get("compile"),
                    "device_tf32_ms": m_tf32.device, "device_tf32_errors": m_tf32.errors})
    roof = roofline_for(device)
    if roof:
        t_roof = roofline_seconds(roof, dtype_name, flops, moved)
        row["roofline_fraction"] = t_roof / (fused * 1e-3) if fused else None
        row["roofline_fraction_device"] = t_roof / (fused_dev * 1e-3) if fused_dev else None
    if kind == "loss":
        row.update(loss_targets(m, m_tf32, floor_ms(roof, dtype_name, (flops, moved))))
    return row


def loss_targets(m: Measured, m_tf32: Optional[Measured], floor: Optional[float]) -> dict:
    """A whole-loss row's reading of issue 14's targets, on device time (CUDA-graph replay; None where it was
    not measured): fused over the floor (target <= 2), torch.compile of the reference loss over fused (target
    >= 2), the latter also with TF32 allowed for compile's GEMMs (fp32 rows)."""
    fused = m.device.get("triton")

    def over(a, b):
        return a / b if a and b else None
    tf32 = (m_tf32.device if m_tf32 is not None else {}).get("compile")
    return {"stages": LOSS_STAGES, "floor_ms": floor, "fused_over_floor": over(fused, floor),
            "compile_over_fused": over(m.device.get("compile"), fused), "compile_tf32_over_fused": over(tf32, fused)}
