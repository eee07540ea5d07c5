"""pytest-benchmark: whole training steps — the engine's path vs eager losses, and HCD vs plain KD.

CPU: the demo models (tiny ViT -> ResNet18 at 32 px); CUDA: Swin-T -> ResNet18 at 224 px, bf16 autocast.
    python -m pytest bench/bench_step.py --benchmark-only
"""
import pytest
import torch

from hcd.engine.bench.step_rows import CPU_SETUP, GPU_SETUP, build_step

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SETUP = GPU_SETUP if CUDA else CPU_SETUP


@pytest.mark.parametrize("kind,backend", [("hcd", "auto"), ("hcd", "eager"), ("kd", "auto")])
def test_step(benchmark, kind, backend):
    step = build_step(SETUP, DEVICE, backend, kind)

    def call():
        step()
        if CUDA:
            torch.cuda.synchronize()
    call()
    benchmark.group = f"step {SETUP.teacher}->{SETUP.student}@{SETUP.img_size} B{SETUP.batch}"
    benchmark.pedantic(call, rounds=10 if CUDA else 5, iterations=1, warmup_rounds=1)
