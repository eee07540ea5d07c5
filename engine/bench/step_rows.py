"""Whole training steps for `hcd bench` (how each is built: step_build.py): the engine step users run
(the trainer's own _micro_step on the DeepSpeed engine of a shipped ImageNet config), the reference loop a
user would otherwise write, and a KD step through the same machinery as the engine step; plus a breakdown
of one engine step by range (breakdown.py).

Rows report ms per step and images/s; the engine row carries the ratios "engine vs reference loop"
(images/s over the reference loop's) and "HCD vs KD" (ms over the KD step's). On CUDA: Swin-T -> ResNet18,
224 px, B = 128, bf16 autocast with fp32 weights (as the reference loop), ZeRO-1 as configured, 1 process.
On CPU: the same config shrunk (tiny ViT teacher, 32 px, B = 16, fp32, 10 classes, no compile, one intra-op
thread: on a shared 2-core machine two threads wait on each other's descheduled partner, 4-5x slower), a
check that the path runs, not a speed.
"""
import contextlib
import importlib.util
import statistics
import time
from typing import Callable, List, Optional

import torch

from hcd.engine.bench.breakdown import step_breakdown
from hcd.engine.bench.step_build import (STEP_CONFIG, VIT_RECIPE_CONFIG, augmented_step_fn, engine_run,
                                         micro_step_fn, reference_step, release, step_config, step_overrides,
                                         synthetic_batch)

KINDS = ("reference loop", "hcd engine", "kd engine", "vit recipe")


def deepspeed_missing() -> Optional[str]:
    """Why the step rows cannot run here (None: they can): the engine step is DeepSpeed's, and `hcd bench`
    must still run its other sections on a machine without DeepSpeed."""
    if importlib.util.find_spec("deepspeed") is None:
        return ("DeepSpeed is not installed, and the engine step is DeepSpeed's (on a GPU session without it: "
                "bash bench/fetch_wheels.sh here, then carry .whl, as bench/gpu_check.sh does)")
    return None


def step_ms(step: Callable[[], None], device: torch.device, quick: bool = False) -> float:
    """Median ms per step over windows of back-to-back steps, one device sync per window: the host runs
    ahead of the device as in training. The first calls (torch.compile, cuDNN autotuning) are warm-up."""
    if device.type == "cuda":
        warmup, windows, per_window = (5, 3, 10) if quick else (10, 5, 20)
    else:
        warmup, windows, per_window = (1, 3, 2) if quick else (2, 5, 4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    samples = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(per_window):
            step()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3 / per_window)
    return statistics.median(samples)


def setup_dict(cfg, device: torch.device, config: str = STEP_CONFIG) -> dict:
    """What the step rows ran: the config, its overrides and the settings that decide the speed."""
    from hcd.engine.speed import resolved
    channels_last, compiled = resolved(cfg, device)
    backend = cfg.head.backend
    return {"config": config, "overrides": list(step_overrides(device, config)), "teacher": cfg.model.teacher,
            "student": cfg.model.student, "img_size": cfg.data.img_size, "batch": cfg.data.batch_size,
            "num_classes": cfg.model.num_classes, "precision": cfg.train.precision,
            "zero_stage": cfg.deepspeed.zero_stage, "channels_last": channels_last, "compile": compiled,
            "loss_backend": ("triton" if device.type == "cuda" else "eager") if backend == "auto" else backend,
            "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None}


def _row(kind: str, ms: float, setup: dict, breakdown: Optional[dict] = None) -> dict:
    label = f"{setup['teacher'].split('_')[0]}->{setup['student']}@{setup['img_size']}/B{setup['batch']}"
    return {"name": f"{kind} {label}", "kind": kind, "ms": ms, "images_per_s": setup["batch"] / (ms * 1e-3),
            "vs_reference": None, "hcd_vs_kd": None, "setup": setup, "breakdown": breakdown}


def _ratios(rows: List[dict]) -> None:
    """On the engine row: images/s over the reference loop's, ms over the KD step's (when measured)."""
    by = {r["kind"]: r for r in rows}
    engine = by.get("hcd engine")
    if engine is None:
        return
    if "reference loop" in by:
        engine["vs_reference"] = engine["images_per_s"] / by["reference loop"]["images_per_s"]
    if "kd engine" in by:
        engine["hcd_vs_kd"] = engine["ms"] / by["kd engine"]["ms"]


@contextlib.contextmanager
def _cpu_threads(device: torch.device):
    """One intra-op thread on CPU for the rows' duration (module docstring), restored after."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def step_rows(device: torch.device, quick: bool = False, on_row: Optional[Callable[[List[dict]], None]] = None,
              breakdown_steps: int = 3) -> List[dict]:
    """The step rows, in KINDS order; on_row(rows so far) after each (a partial results file)."""
    with _cpu_threads(device):
        return _measure(device, quick, on_row, breakdown_steps)


def _measure(device, quick, on_row, breakdown_steps) -> List[dict]:
    cfg = step_config(device)
    setup = setup_dict(cfg, device)
    images, labels = synthetic_batch(cfg, device)
    rows: List[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        _ratios(rows)
        if on_row:
            on_row(rows)

    add(_row("reference loop", step_ms(reference_step(cfg, images, labels), device, quick), setup))
    release()
    row, teacher = _engine_row(cfg, setup, images, labels, quick, breakdown_steps)
    release()  # the engine row's DeepSpeed engine, out of scope now
    add(row)
    # the KD step reuses the engine row's prepared (compiled) teacher: the same model, compiled once
    kd = engine_run(cfg, "kd", teacher_fn=teacher)
    ms = step_ms(micro_step_fn(kd, images, labels), device, quick)
    release(kd)
    add(_row("kd engine", ms, setup))
    # the other direction under DeiT's recipe (step_build.py): its own config, models and batch
    vit = step_config(device, VIT_RECIPE_CONFIG)
    run = engine_run(vit, "hcd")
    ms = step_ms(augmented_step_fn(run, *synthetic_batch(vit, device)), device, quick)
    release(run)
    add(_row("vit recipe", ms, setup_dict(vit, device, VIT_RECIPE_CONFIG)))
    return rows


def _engine_row(cfg, setup, images, labels, quick, breakdown_steps):
    """The engine step's row with its breakdown, and its prepared teacher; the engine is released."""
    run = engine_run(cfg, "hcd")
    ms = step_ms(micro_step_fn(run, images, labels), images.device, quick)
    breakdown = step_breakdown(run, images, labels, breakdown_steps)
    release(run)
    return _row("hcd engine", ms, setup, breakdown), run.teacher
