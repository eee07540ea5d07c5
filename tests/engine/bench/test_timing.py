"""How one call is timed. time_ms's CUDA path runs here against a simulated device clock (fake events),
which checks its protocol without a GPU: warm-up and repetition counts from the estimate, the L2 flush and
dropped gradients before every timed call, the flush outside the timed region, the median."""
import re
import statistics
from pathlib import Path

import torch

from hcd.engine.bench import timing
from hcd.engine.bench.timing import time_ms, try_cuda

ENGINE = Path(__file__).resolve().parents[3] / "engine"


class _Clock:
    """Simulated device time in ms: the fake events read it, the calls and the flush advance it."""
    now = 0.0


class _Event:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = _Clock.now

    def elapsed_time(self, end):
        return end.t - self.t


class _Flush:
    def __init__(self, ms):
        self.ms, self.count = ms, 0

    def zero_(self):
        self.count += 1
        _Clock.now += self.ms


def _simulated_cuda(monkeypatch, flush_ms):
    _Clock.now = 0.0
    flush = _Flush(flush_ms)
    monkeypatch.setattr(timing, "_event", _Event)
    monkeypatch.setattr(timing, "_l2_flush_buffer", lambda: flush)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: __import__("contextlib").nullcontext())
    return flush


def _call(x, durations, calls, flush):
    """fn(): 1000 ms the first time (compilation), then the next of `durations`; logs the grad and flush state."""
    def fn():
        ms = 1000.0 if not calls else durations[len(calls) % len(durations)]
        calls.append({"ms": ms, "grad_none": x.grad is None, "flushes": flush.count})
        _Clock.now += ms
        x.grad = torch.ones(1)
    return fn


def test_cuda_time_ms_follows_the_do_bench_protocol(monkeypatch):
    flush = _simulated_cuda(monkeypatch, flush_ms=0.5)
    x, calls = torch.zeros(1, requires_grad=True), []
    durations = [1.0] * 6 + [0.9, 1.3, 1.1]  # the 5 estimate calls (calls 1-5) take 1.0 ms
    ms = time_ms(_call(x, durations, calls, flush), torch.device("cuda"), grad_to_none=[x])
    # the estimate: 5 flushed calls of 1.0 ms (flush included, as do_bench does) -> 1.5 ms per call;
    # warm-up 25 ms / 1.5 -> 16 calls, repetitions 200 ms / 1.5 -> 133 calls
    assert len(calls) == 1 + 5 + 16 + 133
    timed = calls[-133:]
    assert all(c["grad_none"] for c in timed)  # gradients dropped before every timed call
    assert [c["flushes"] for c in timed] == list(range(6, 6 + 133))  # L2 flushed right before each
    assert ms == statistics.median(c["ms"] for c in timed)  # the flush's 0.5 ms is outside the timed region


def test_cuda_time_ms_quick_is_shorter(monkeypatch):
    flush = _simulated_cuda(monkeypatch, flush_ms=0.0)
    x, calls = torch.zeros(1, requires_grad=True), []
    assert time_ms(_call(x, [2.0], calls, flush), torch.device("cuda"), quick=True) == 2.0
    assert len(calls) == 1 + 5 + 5 + 25  # warm-up 10 ms, repetitions 50 ms at 2 ms a call


def test_cpu_time_ms_is_a_median_of_a_timed_loop():
    x, seen = torch.zeros(1, requires_grad=True), []

    def fn():
        seen.append(x.grad is None)
        x.grad = torch.ones(1)
    assert time_ms(fn, torch.device("cpu"), grad_to_none=[x], quick=True) >= 0
    assert seen == [True, True, True, True]  # a warm-up, then 3 timed calls with their gradients dropped


def test_engine_never_imports_triton():
    """Triton stays inside kernels/ (ARCHITECTURE.md): engine/ reaches it only through hcd.kernels."""
    bare = re.compile(r"^\s*(import triton|from triton\b)", re.M)
    assert [str(p.relative_to(ENGINE)) for p in ENGINE.rglob("*.py") if bare.search(p.read_text())] == []


def test_try_cuda_reports_the_first_cause_in_one_line():
    def capture():
        try:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    assert try_cuda(lambda: 1.5) == (1.5, None)
    value, reason = try_cuda(capture)
    assert value is None and reason == "RuntimeError: operation not permitted when stream is capturing"
