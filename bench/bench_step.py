"""pytest-benchmark: whole training steps as `hcd bench`'s step rows build them (engine/bench/step_build.py):
the reference loop a user would otherwise write, the engine step (the trainer's own _micro_step on the
DeepSpeed engine of configs/imagenet/swin_tiny-resnet18.yaml) and a KD step through the same machinery.

CPU: that config shrunk to a tiny ViT teacher at 32 px, B=16, fp32; CUDA: the config at B=128, bf16.
    python -m pytest bench/bench_step.py --benchmark-only
"""
import pytest
import torch

from hcd.engine.bench.step_build import engine_run, micro_step_fn, reference_step, release, step_config, synthetic_batch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.mark.parametrize("kind", ["reference", "hcd", "kd"])
def test_step(benchmark, kind):
    cfg = step_config(DEVICE)
    images, labels = synthetic_batch(cfg, DEVICE)
    run = None if kind == "reference" else engine_run(cfg, kind)
    step = reference_step(cfg, images, labels) if run is None else micro_step_fn(run, images, labels)

    def call():
        step()
        if CUDA:
            torch.cuda.synchronize()
    try:
        call()
        benchmark.group = f"step {cfg.model.teacher}->{cfg.model.student}@{cfg.data.img_size} B{cfg.data.batch_size}"
        benchmark.pedantic(call, rounds=10 if CUDA else 5, iterations=1, warmup_rounds=1)
    finally:
        release(run)
