"""Where one engine step's time goes, range by range, for `hcd bench`'s step rows.

The step is the trainer's own _micro_step, run on a copy of the Run whose teacher and DeepSpeed engine are
wrapped, plus forward hooks on the student and the projectors: each wrapper or hook marks the start of the
next range (host clock and, on CUDA, a CUDA event on the current stream). A range's time is the time from
its mark to the next one, summed over its visits (the projectors and the loss alternate stage by stage).
Host ms: Python's time to issue the range. Device ms (CUDA): the GPU's timeline between the events; the
step runs on an idle GPU, so a range whose issue is slower than its kernels shows the host's pace.
"""
import dataclasses
import statistics
import time
from typing import Dict, List, Optional

import torch

from hcd.engine import trainer

RANGES = (
    "teacher forward",     # from the step's start: the input's NHWC copy and the frozen teacher
    "student forward",     # the input cast, DeepSpeed's forward entry and the student with its stage features
    "projectors forward",  # every stage's projector
    "loss",                # student CE + KD and every head (the fused path computes dLoss/dZ here)
    "backward",            # engine.backward: student, projectors and the loss's dX/dW GEMMs
    "optimizer step",      # engine.step: the optimizer, the LR scheduler, zeroing the gradients
    "bookkeeping",         # non-finite flags, LR read, found_inf, the metric window
)


class Marks:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.points: List[tuple] = []   # (range, host seconds, CUDA event or None)

    def __call__(self, name: str) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.points.append((name, time.perf_counter(), event))

    def totals(self) -> Dict[str, dict]:
        """{range: {"host_ms", "device_ms"}} from the marks so far (the last mark ends the step)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {name: {"host_ms": 0.0, "device_ms": 0.0 if self.cuda else None} for name in RANGES}
        for (name, t0, e0), (_, t1, e1) in zip(self.points, self.points[1:]):
            out[name]["host_ms"] += (t1 - t0) * 1e3
            if self.cuda:
                out[name]["device_ms"] += e0.elapsed_time(e1)
        return out


class MarkedEngine:
    """The DeepSpeed engine as _micro_step uses it, marking where forward, backward and step begin and end;
    everything else (get_lr, client_optimizer, module) is the engine's own."""

    def __init__(self, engine, mark: Marks):
        self._engine, self._mark = engine, mark

    def __call__(self, *args, **kwargs):
        out = self._engine(*args, **kwargs)
        self._mark("bookkeeping")
        return out

    def backward(self, loss):
        self._mark("backward")
        self._engine.backward(loss)
        self._mark("bookkeeping")

    def step(self):
        self._mark("optimizer step")
        self._engine.step()
        self._mark("bookkeeping")

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _marked_teacher(teacher, mark: Marks):
    def run_teacher(images):
        out = teacher(images)
        mark("student forward")
        return out
    return run_teacher


def _hooks(distiller, mark: Marks) -> list:
    """Forward hooks: the loss follows the student and each projector; a projector starts its range."""
    handles = [distiller.student.register_forward_hook(lambda *_: mark("loss"))]
    for p in distiller.projectors:
        handles.append(p.register_forward_pre_hook(lambda *_: mark("projectors forward")))
        handles.append(p.register_forward_hook(lambda *_: mark("loss")))
    return handles


def step_breakdown(run: "trainer.Run", images, labels, steps: int = 3) -> Dict[str, dict]:
    """Per range, the median over `steps` marked steps of host ms and device ms (None on CPU), plus
    "total"."""
    return _medians([_marked_step(run, images, labels) for _ in range(steps)])


def _marked_step(run: "trainer.Run", images, labels) -> Dict[str, dict]:
    """One _micro_step on a copy of `run` with marks (module docstring), started on an idle device."""
    mark = Marks(run.d.device)
    handles = _hooks(run.engine.module.distiller, mark)
    try:
        marked = dataclasses.replace(run, engine=MarkedEngine(run.engine, mark),
                                     teacher=_marked_teacher(run.teacher, mark), micro=0)
        if mark.cuda:
            torch.cuda.synchronize()
        mark("teacher forward")
        trainer._micro_step(marked, images, labels)
        mark("bookkeeping")  # the step's end (closes the last range)
    finally:
        for h in handles:
            h.remove()
    return mark.totals()


def _median(values: List[Optional[float]]) -> Optional[float]:
    return None if values[0] is None else statistics.median(values)


def _medians(samples: List[Dict[str, dict]]) -> Dict[str, dict]:
    out = {name: {k: _median([s[name][k] for s in samples]) for k in ("host_ms", "device_ms")} for name in RANGES}
    totals = [{k: None if s[RANGES[0]][k] is None else sum(s[n][k] for n in RANGES) for k in ("host_ms", "device_ms")}
              for s in samples]
    out["total"] = {k: _median([t[k] for t in totals]) for k in ("host_ms", "device_ms")}
    return out
