"""pytest-benchmark: the HCD head and the student loss, eager vs torch.compile vs fused Triton.

CUDA: CIFAR (B=128, C=100) and ImageNet (B=256, C=1000) shapes, n in {2, 4, 8}, fp32/bf16/fp16, modes
forward/backward/full. CPU: small shapes, eager and compile only (the interpreter is not a speed).
    python -m pytest bench/bench_kernels.py --benchmark-only --benchmark-group-by=param:case
"""
import pytest
import torch

from engine.bench import (CPU_SHAPES, GPU_SHAPES, MODES, DTYPES, grad_tensors, head_loss_fn, make_head_inputs,
                          mode_fn, student_loss_fn)
from kernels import HCDLossConfig

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SHAPES = GPU_SHAPES if CUDA else CPU_SHAPES
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
    inp = make_head_inputs(shape, DTYPES[dtype], DEVICE)
    grads = grad_tensors(inp)
    benchmark.group = f"head {shape} {dtype} {mode}"
    benchmark.extra_info.update(case=f"{shape}-{dtype}-{mode}", backend=backend)
    _run(benchmark, mode_fn(head_loss_fn(inp, HCDLossConfig(n_sublogits=shape.n), backend), mode, grads), grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("BC", [(128, 100), (256, 1000)], ids=lambda bc: f"B{bc[0]}-C{bc[1]}")
def test_student(benchmark, BC, dtype, backend):
    from engine.bench import HeadShape
    inp = make_head_inputs(HeadShape(BC[0], BC[1], 1, 1, 1), DTYPES[dtype], DEVICE)
    grads = grad_tensors(inp)
    benchmark.group = f"student B{BC[0]} C{BC[1]} {dtype} full"
    _run(benchmark, mode_fn(student_loss_fn(inp, HCDLossConfig(), backend), "full", grads), grads)
