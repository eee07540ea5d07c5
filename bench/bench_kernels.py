"""pytest-benchmark: the HCD head and the student loss, eager vs torch.compile vs fused Triton.

CUDA: CIFAR (B=128, C=100) and ImageNet (B=256, C=1000) shapes with every shipped config's Dp/Dt
(engine/bench/shapes.py), n in {2, 4, 8}, fp32/bf16/fp16, modes
forward/backward/full. CPU: small shapes, eager and compile only (the interpreter is not a speed).
Inputs and references come from the tests (tests/kernels/helpers.py), so benchmark and test never diverge.
    python -m pytest bench/bench_kernels.py --benchmark-only
"""
import pytest
import torch

from hcd.engine.bench.kernel_rows import grad_tensors, head_loss_fn, mode_fn, no_donated_buffers, student_loss_fn
from hcd.engine.bench.plan import DTYPES, MODES
from hcd.engine.bench.shapes import CPU_SHAPES, STUDENT_SHAPES, gpu_head_shapes
from hcd.kernels import HCDLossConfig
from tests.kernels.helpers import make_inputs

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SHAPES = gpu_head_shapes() if CUDA else CPU_SHAPES
BACKENDS = ["eager", "compile", "triton"] if CUDA else ["eager", "compile"]
DTYPE_NAMES = list(DTYPES) if CUDA else ["fp32"]


def _run(benchmark, fn, grads):
    def call():
        for t in grads:
            t.grad = None
        fn()
        if CUDA:
            torch.cuda.synchronize()
    call()  # warm-up / compile outside the measurement
    benchmark.pedantic(call, rounds=20 if CUDA else 5, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s.B}-C{s.C}-n{s.n}-Dp{s.Dp}-Dt{s.Dt}")
def test_head(benchmark, shape, dtype, mode, backend):
    inp = make_inputs(shape, DTYPES[dtype], DEVICE)
    grads = grad_tensors(inp)
    benchmark.group = f"head B{shape.B} C{shape.C} n{shape.n} {dtype} {mode}"
    with no_donated_buffers():
        _run(benchmark, mode_fn(head_loss_fn(inp, HCDLossConfig(n_sublogits=shape.n), backend), mode), grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("shape", STUDENT_SHAPES, ids=lambda s: f"B{s.B}-C{s.C}")
def test_student(benchmark, shape, dtype, backend):
    inp = make_inputs(shape, DTYPES[dtype], DEVICE)
    grads = grad_tensors(inp)
    benchmark.group = f"student B{shape.B} C{shape.C} {dtype} full"
    _run(benchmark, mode_fn(student_loss_fn(inp, HCDLossConfig(), backend), "full"), grads)
