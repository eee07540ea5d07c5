"""Where one call's device time goes, launch by launch (CUDA): torch.profiler's kernel events of a few
identical calls, split into the launches of one call, the fused head's launches named after its plan and
rated by the cost model. Shows which launch dominates and how long the GPU waits for the host between them.
"""
import statistics
from typing import Callable, List, Sequence, Tuple

import torch

from hcd.engine.bench.kernel_rows import backends_for, grad_tensors, head_loss_fn, mode_fn
from hcd.engine.bench.plan import DTYPES
from hcd.engine.bench.roofline import head_launch_costs, per_second
from hcd.engine.bench.shapes import headline_shape, shape_dict
from hcd.engine.bench.timing import clear_grads, host_ms, try_cuda
from hcd.kernels import HCDLossConfig
from hcd.kernels.testing import make_inputs

# The fused head's Triton launches in launch order (kernels/hcd_head.py's plan), by kernel name.
FUSED_PLAN = {"_gemm_kernel": ("z_gemm", "dx_gemm", "dw_gemm"), "_head_row_kernel": ("row",)}


def launch_profile(fn: Callable[[], object], grads: Sequence[torch.Tensor] = (), calls: int = 5) -> dict:
    """Per-launch device time of fn() (CUDA): torch.profiler over `calls` calls, see per_launch."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        clear_grads(grads)
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            clear_grads(grads)
            fn()
        torch.cuda.synchronize()
    clear_grads(grads)
    events = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
              if e.device_type == DeviceType.CUDA]
    if not events:  # CUPTI unavailable or taken by another profiler: say so instead of "0 launches"
        raise RuntimeError("torch.profiler recorded no CUDA kernels (is CUPTI available?)")
    return per_launch(events, calls)


def per_launch(events: List[Tuple[str, float, float]], calls: int) -> dict:
    """Device events (name, start_us, end_us) of `calls` identical calls -> the launches of one call.

    Returns {"launches": [{"launch", "kernel", "us"}], "kernel_us", "span_us", "per_call"}: launches in
    order with their mean duration, the summed kernel time of one call, and the mean span from its first
    kernel's start to its last kernel's end (span well above kernel_us: the GPU waited for the host).
    When the calls did not launch the same sequence, launches are grouped by kernel name instead
    ("launch" is then None, "count" the launches per call) and span_us is None.
    """
    events = sorted(events, key=lambda e: e[1])
    per, rest = divmod(len(events), calls) if calls > 0 else (0, 1)
    chunks = [events[i * per:(i + 1) * per] for i in range(calls)] if per and not rest else []
    same = bool(chunks) and all([e[0] for e in c] == [e[0] for e in chunks[0]] for c in chunks)
    if same:
        launches = [{"launch": i + 1, "kernel": chunks[0][i][0],
                     "us": statistics.mean(c[i][2] - c[i][1] for c in chunks)} for i in range(per)]
        span = statistics.mean(c[-1][2] - c[0][1] for c in chunks)
    else:
        by_name = {}
        for name, start, end in events:
            count, total = by_name.get(name, (0, 0.0))
            by_name[name] = (count + 1, total + end - start)
        launches = [{"launch": None, "kernel": name, "count": count / max(calls, 1), "us": total / max(calls, 1)}
                    for name, (count, total) in sorted(by_name.items(), key=lambda kv: -kv[1][1])]
        span = None
    return {"launches": launches, "kernel_us": sum(r["us"] for r in launches), "span_us": span,
            "per_call": per if same else None}


def profile_rows(device) -> List[dict]:
    """Per-launch device time of the full (forward + backward) head at the headline shape, every backend,
    bf16 and fp32 (CUDA only): which launch dominates, and how long the GPU waits between launches."""
    if device.type != "cuda":
        return []
    rows = []
    s = headline_shape()
    cfg = HCDLossConfig(n_sublogits=s.n)
    for dtype_name in ("bf16", "fp32"):
        inp = make_inputs(s, DTYPES[dtype_name], device)
        grads = grad_tensors(inp)
        torch._dynamo.reset()
        for backend in backends_for(device):
            fn = mode_fn(head_loss_fn(inp, cfg, backend), "full")
            prof, err = try_cuda(lambda: launch_profile(fn, grads))
            if prof and backend == "triton":
                nbytes = torch.finfo(DTYPES[dtype_name]).bits // 8
                annotate_launches(prof["launches"], head_launch_costs(s, nbytes))
            rows.append({"kernel": "head", "shape": shape_dict(s), "dtype": dtype_name, "mode": "full",
                         "backend": backend, "host_ms": host_ms(fn, grads), **(prof or {}), "error": err})
    return rows


def annotate_launches(launches: List[dict], costs: dict) -> None:
    """Name the fused launches after the plan and add their achieved TFLOP/s and GB/s (in place), from the
    cost model: the n-th launch of a kernel is the n-th plan entry for it. Other launches (torch's own
    small ops) stay unnamed."""
    seen = {}
    for launch in launches:
        if launch.get("launch") is None:  # grouped by name (the calls differed): no order to go by
            continue
        plan = FUSED_PLAN.get(launch["kernel"])
        k = seen.get(launch["kernel"], 0)
        seen[launch["kernel"]] = k + 1
        if plan is None or k >= len(plan) or plan[k] not in costs or not launch["us"]:
            continue
        flops, nbytes = costs[plan[k]]
        ms = launch["us"] * 1e-3
        launch.update(plan=plan[k], tflops=per_second(flops, ms), gbps=per_second(nbytes, ms, 1e9))
