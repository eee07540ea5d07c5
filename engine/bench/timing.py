"""How `hcd bench` times one call, in three views that disagree at the loss heads' real sizes.

- time_ms: back-to-back calls as a user's Python loop sees them (on CUDA: CUDA-event medians with L2
  flushed between calls; on CPU: a timed loop). It includes the host's time whenever the host is slower
  than the GPU, which it is for kernels of tens of microseconds.
- host_ms (CUDA): the Python time to issue one call, the GPU idle before it. When it is close to
  time_ms, the call is host-bound and time_ms says nothing about the kernels.
- graph_ms (CUDA): device time alone. The call is captured (several times, unrolled) in a CUDA graph and
  replayed: no Python, no launch gaps from the host. It is what the losses cost inside a training step,
  where the GPU queue is full and the host runs ahead, and the only fair base for a roofline fraction.
  L2 is warm here (not flushed between the captured calls).
Where the device time of one call goes, launch by launch, is profile.py's.
"""
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch

L2_FLUSH_BYTES = 256 * 2 ** 20  # zeroed before every timed CUDA call: larger than any current GPU's L2


def clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none=None, quick=False) -> float:
    """Median milliseconds of fn(), launch-inclusive; grad_to_none's gradients are dropped before each call
    (fn may run a backward that would otherwise accumulate into them). quick: fewer, shorter repetitions."""
    grads = grad_to_none or ()
    if device.type == "cuda":
        with torch.cuda.device(device):
            return cuda_median_ms(fn, grads, warmup_ms=10 if quick else 25, rep_ms=50 if quick else 200)
    reps = 3 if quick else 10
    fn()  # warm-up (and compilation for torch.compile)
    samples = []
    for _ in range(reps):
        clear_grads(grads)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def cuda_median_ms(fn: Callable[[], object], grads: Sequence[torch.Tensor] = (), warmup_ms: float = 25.0,
                   rep_ms: float = 200.0) -> float:
    """Median CUDA-event milliseconds of fn() on the current device, each call timed alone after L2 was
    flushed (no call profits from its predecessor's data still in the cache). The numbers of warm-up and
    timed calls fill about warmup_ms and rep_ms, from an estimate over 5 calls after a first one (which
    compiles or autotunes: torch.compile's first call can take seconds, so it is never in the estimate)."""
    fn()
    torch.cuda.synchronize()
    flush = _l2_flush_buffer()
    start, end = _event(), _event()
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)  # events resolve ~0.5 us: never divide by zero
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    events = [(_event(), _event()) for _ in range(max(1, int(rep_ms / estimate)))]
    for start, end in events:
        clear_grads(grads)
        flush.zero_()  # before the start event: the flush itself is not timed
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _l2_flush_buffer() -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")


def _event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


def host_ms(fn: Callable[[], object], grads: Sequence[torch.Tensor] = (), reps: int = 30) -> float:
    """Median Python time to issue fn() on an idle GPU (CUDA only; the queue is drained before each)."""
    samples = []
    for _ in range(reps):
        clear_grads(grads)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(samples)


def graph_ms(make_fn: Callable[[], Callable[[], object]], grads: Sequence[torch.Tensor] = (),
             calls: int = 10, samples: int = 10, replays: int = 5) -> float:
    """Median device milliseconds per call: make_fn() built, warmed up and captured `calls` times into one
    CUDA graph on a side stream, then replayed `replays` times back to back per sample (so one graph
    launch's host latency is spread over replays * calls calls). Raises whatever the capture raises.

    make_fn builds the callable on the capture stream because autograd runs every backward op on the
    stream of its forward op. For the same reason the caller must have dropped every autograd graph it
    built on another stream (e.g. the "backward" mode's retained one): while one is alive, the inputs'
    gradient-accumulation nodes stay bound to that stream and the capture breaks.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    pool = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        fn = make_fn()
        for _ in range(3):  # warm-up on this stream: compilation, autotuning and allocator pools
            clear_grads(grads)
            fn()
        side.synchronize()
        try:
            with torch.cuda.graph(graph, pool=pool, stream=side):
                for _ in range(calls):
                    clear_grads(grads)  # the gradients are then allocated from the graph's own pool
                    fn()
        except Exception:
            _release_failed_capture(pool)
            raise
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()  # the first replay uploads the graph: not timed
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        start, end = _event(), _event()
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (replays * calls))
    clear_grads(grads)
    del graph
    return statistics.median(times)


def _release_failed_capture(pool) -> None:
    """After a failed capture, some torch versions (2.11 among them) leave the caching allocator routing
    allocations to the graph's pool, and the next capture or empty_cache() then fails. Close the pool by
    hand; best effort (private API: absent or already done elsewhere)."""
    device = torch.cuda.current_device()
    for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
        try:
            getattr(torch._C, name)(device, pool)
        except (AttributeError, RuntimeError):
            pass


def try_cuda(measure: Callable[[], object]) -> Tuple[Optional[object], Optional[str]]:
    """(result, None), or (None, a one-line reason) when a CUDA-only measurement fails (a capture refused
    by a backend): the table shows "-" and the JSON keeps the reason instead of the run dying. The reason
    is the first cause in the chain (a failed capture_end reports "previous error during capture")."""
    try:
        return measure(), None
    except Exception as exc:  # noqa: BLE001 -- reported, not swallowed: it lands in the results JSON
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 -- a sticky error: the next CUDA call will say so loudly
            pass
        cause = exc
        for _ in range(8):  # a bounded walk: chains are short, and must not cycle
            if cause.__context__ is None:
                break
            cause = cause.__context__
        text = str(cause).splitlines()[0] if str(cause) else ""
        return None, f"{type(cause).__name__}: {text}"[:300]
