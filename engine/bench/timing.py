"""How `hcd bench` times one call, in three views that disagree at the loss heads' real sizes.

- time_ms: back-to-back calls as a user's Python loop sees them (triton.testing.do_bench medians, L2
  flushed between calls, on CUDA; a timed loop on CPU). It includes the host's time whenever the host
  is slower than the GPU, which it is for kernels of tens of microseconds.
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


def clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none=None, quick=False) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 200,
                                             grad_to_none=grad_to_none, return_mode="median"))
    reps = 3 if quick else 10
    fn()  # warm-up (and compilation for torch.compile)
    samples = []
    for _ in range(reps):
        clear_grads(grad_to_none or ())
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


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
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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
