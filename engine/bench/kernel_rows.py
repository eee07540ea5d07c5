"""One kernel row of `hcd bench`: a loss (HCD head or student) at one shape, dtype and mode, timed for each
backend (eager, torch.compile, the fused Triton path), with the fused path's achieved rates.

Inputs come from hcd.kernels.testing.make_inputs: the same generator the tests and `hcd verify` use.
"""
import contextlib
import gc
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from hcd.engine.bench.plan import DTYPES
from hcd.engine.bench.roofline import head_cost, per_second, roofline_for, roofline_seconds, student_cost
from hcd.engine.bench.shapes import configs_for, shape_dict
from hcd.engine.bench.timing import clear_grads, graph_ms, host_ms, time_ms, try_cuda
from hcd.kernels import HCDLossConfig, hcd_head_loss, student_loss
from hcd.kernels.testing import Case, make_inputs


def head_loss_fn(inp: dict, cfg: HCDLossConfig, backend: str) -> Callable[[], torch.Tensor]:
    return lambda: hcd_head_loss(inp["x_student"], inp["x_teacher"], inp["weight"], inp["bias"],
                                 inp["teacher_logits"], inp["student_logits"], inp["target"], cfg,
                                 backend=backend)[0]


def student_loss_fn(inp: dict, cfg: HCDLossConfig, backend: str) -> Callable[[], torch.Tensor]:
    return lambda: student_loss(inp["student_logits"], inp["teacher_logits"], inp["target"], cfg,
                                backend=backend)[0]


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
    inp = make_inputs(shape, DTYPES[dtype_name], device)
    make = head_loss_fn if kind == "head" else student_loss_fn
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
    flops, moved = (head_cost(shape, nbytes, mode) if kind == "head"
                    else student_cost(shape.B, shape.C, nbytes, mode))
    fused, fused_dev = m.ms.get("triton"), m.device.get("triton")
    row = {"kernel": kind, "shape": shape_dict(shape), "configs": configs_for(shape) if kind == "head" else [],
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
    return row
