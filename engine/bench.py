"""`hcd bench`: fused vs eager vs torch.compile for the loss kernels and whole training steps.

Prints a table of ratios, achieved TFLOP/s and GB/s against the card's roofline and peak memory, and writes
bench/results/<device>-<date>.json. On CPU the shapes are small and the Triton path (which would run in the
interpreter) is timed at a tiny shape only, marked "interpreter" and left out of every ratio.
Timing (engine/timing.py): launch-inclusive medians (do_bench on CUDA, a timed loop on CPU) for every
backend; on CUDA also the host's issue time of the fused call, device time from CUDA-graph replay (the
roofline's base) and, for the headline shape, a per-launch profile of every backend.
"""
import datetime as _dt
import gc
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import torch

from hcd.kernels import HCDLossConfig, hcd_head_loss, student_loss
from hcd.engine.bench_shapes import configs_for, gpu_head_shapes, headline_shape
from hcd.engine.errors import output_path_problem
from hcd.engine.runinfo import commit, device_name, resolve_device, versions, write_json
from hcd.engine.timing import clear_grads, graph_ms, host_ms, launch_profile, time_ms, try_cuda
from hcd.kernels.testing import Case, make_inputs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("forward", "backward", "full")

# Dense peaks (TFLOP/s without sparsity; fp32 = non-tensor-core IEEE, what torch uses by default) and HBM GB/s.
ROOFLINES = {
    "H100": {"tflops": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0}, "gbps": 3350.0},
    "H200": {"tflops": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0}, "gbps": 4800.0},
    "A100": {"tflops": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0}, "gbps": 2039.0},
}


# GPU head shapes: hcd.engine.bench_shapes (B, C per dataset; Dp, Dt from the shipped configs). CPU: small ones.
# Heads as in training: the teacher feature x_teacher is frozen (no dX for its columns).
# Inputs come from hcd.kernels.testing.make_inputs: the same generator the tests and `hcd verify` use.
CPU_SHAPES = [Case(64, 100, 4, 256, 192, frozen_teacher_feature=True),
              Case(128, 100, 4, 768, 768, frozen_teacher_feature=True)]
INTERPRETER_SHAPE = Case(16, 10, 2, 32, 24)
STUDENT_SHAPES = [Case(128, 100, 1, 1, 1), Case(256, 1000, 1, 1, 1)]


def shape_dict(case: Case) -> dict:
    return {"B": case.B, "C": case.C, "n": case.n, "Dp": case.Dp, "Dt": case.Dt}


def head_loss_fn(inp: dict, cfg: HCDLossConfig, backend: str) -> Callable[[], torch.Tensor]:
    return lambda: hcd_head_loss(inp["x_student"], inp["x_teacher"], inp["weight"], inp["bias"],
                                 inp["teacher_logits"], inp["student_logits"], inp["target"], cfg,
                                 backend=backend)[0]


def student_loss_fn(inp: dict, cfg: HCDLossConfig, backend: str) -> Callable[[], torch.Tensor]:
    return lambda: student_loss(inp["student_logits"], inp["teacher_logits"], inp["target"], cfg,
                                backend=backend)[0]


def grad_tensors(inp: dict) -> List[torch.Tensor]:
    return [t for t in inp.values() if isinstance(t, torch.Tensor) and t.requires_grad]


# ------------------------------------------------------------------------------------------------ costs

FORWARD_LAUNCHES = ("z_gemm", "row", "loss_sum")   # the fused forward (dLoss/dZ is computed in it)
BACKWARD_LAUNCHES = ("dx_gemm", "dw_gemm", "dz_scale")


def _mode_cost(launches: dict, mode: str):
    names = {"forward": FORWARD_LAUNCHES, "backward": BACKWARD_LAUNCHES,
             "full": FORWARD_LAUNCHES + BACKWARD_LAUNCHES}[mode]
    picked = [launches[k] for k in names if k in launches]
    return sum(f for f, _ in picked), sum(b for _, b in picked)


def head_launch_costs(shape: Case, dtype_bytes: int) -> dict:
    """Per-launch (FLOP, bytes) of one stage's head at `shape`, from the fused launch plan's own model."""
    from hcd.kernels.costs import head_flops_bytes
    return head_flops_bytes(shape.B, shape.C, shape.n, shape.Dp, shape.Dt, dtype_bytes,
                            x_teacher_grad=not shape.frozen_teacher_feature)


def head_cost(shape: Case, dtype_bytes: int, mode: str):
    """(FLOP, bytes) of one stage's head in `mode`."""
    return _mode_cost(head_launch_costs(shape, dtype_bytes), mode)


def student_cost(B: int, C: int, dtype_bytes: int, mode: str):
    from hcd.kernels.costs import student_flops_bytes
    return _mode_cost(student_flops_bytes(B, C, dtype_bytes), mode)


def roofline_for(device: torch.device) -> Optional[dict]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in ROOFLINES.items() if k in name), None)


# ------------------------------------------------------------------------------------------------ timing

def mode_fn(loss_fn: Callable[[], torch.Tensor], mode: str):
    """The callable to time for a mode. backward times only the backward of a graph built once outside
    the timed region (retain_graph); full times forward + backward. The fused path computes dLoss/dZ inside
    its forward by design, so its "forward" already holds most of its gradient work: compare "full"."""
    if mode == "forward":
        return loss_fn
    if mode == "full":
        return lambda: loss_fn().backward()
    loss = loss_fn()
    return lambda: loss.backward(retain_graph=True)


def _no_donated_buffers():
    """torch.compile's backward frees ("donates") its saved buffers, which forbids the retain_graph that
    the backward-only mode needs; the flag exists from torch 2.6 on."""
    import contextlib
    from torch._functorch import config
    return config.patch(donated_buffer=False) if hasattr(config, "donated_buffer") else contextlib.nullcontext()


def peak_mem_mb(fn, device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def _backends(device):
    """Every baseline and the fused path where it runs compiled (the interpreter only when asked for)."""
    return ["eager", "compile"] + (["triton"] if device.type == "cuda" else [])


def bench_kernel_row(kind: str, shape: Case, dtype_name: str, mode: str, device, quick=False,
                     backends=None, fresh_compile=True) -> dict:
    """One table row: launch-inclusive medians per backend (and on CUDA: device time per backend from
    CUDA-graph replay, the fused call's host issue time), the fused path's TFLOP/s, GB/s and roofline
    fraction on both time bases, peak memory."""
    cfg = HCDLossConfig(n_sublogits=shape.n)
    dtype = DTYPES[dtype_name]
    inp = make_inputs(shape, dtype, device)
    make = head_loss_fn if kind == "head" else student_loss_fn
    grads = grad_tensors(inp)
    ms, mem, dev_ms, host, errors = {}, {}, {}, {}, {}
    if fresh_compile:
        torch._dynamo.reset()
    for backend in backends or _backends(device):
        with _no_donated_buffers():
            fn = mode_fn(make(inp, cfg, backend), mode)
            ms[backend] = time_ms(fn, device, grad_to_none=grads, quick=quick)
            mem[backend] = peak_mem_mb(fn, device)
            if device.type == "cuda":
                host[backend] = host_ms(fn, grads)
                del fn  # its retained graph would bind the inputs' grad accumulation to this stream
                gc.collect()
                dev_ms[backend], err = try_cuda(lambda: graph_ms(lambda: mode_fn(make(inp, cfg, backend), mode),
                                                                 grads))
                if err:
                    errors[backend] = err
        clear_grads(grads)
    interp = device.type == "cpu" and "triton" in ms
    nbytes = torch.finfo(dtype).bits // 8
    flops, nbytes_moved = (head_cost(shape, nbytes, mode) if kind == "head"
                           else student_cost(shape.B, shape.C, nbytes, mode))
    fused, fused_dev = ms.get("triton"), dev_ms.get("triton")
    row = {"kernel": kind, "shape": shape_dict(shape), "configs": configs_for(shape) if kind == "head" else [],
           "dtype": dtype_name, "mode": mode,
           "eager_ms": ms.get("eager"), "compile_ms": ms.get("compile"), "fused_ms": fused,
           "fused_tflops": per_second(flops, fused) if not interp else None,
           "fused_gbps": per_second(nbytes_moved, fused, 1e9) if not interp else None,
           "peak_mem_mb": mem, "interpreter": interp}
    if device.type == "cuda":
        row.update({"host_ms": host, "device_ms": dev_ms, "device_errors": errors,
                    "device_tflops": per_second(flops, fused_dev), "device_gbps": per_second(nbytes_moved, fused_dev, 1e9)})
    roof = roofline_for(device)
    if roof:
        t_roof = max(flops / (roof["tflops"][dtype_name] * 1e12), nbytes_moved / (roof["gbps"] * 1e9))
        row["roofline_fraction"] = t_roof / (fused * 1e-3) if fused else None
        row["roofline_fraction_device"] = t_roof / (fused_dev * 1e-3) if fused_dev else None
    return row


def per_second(amount, ms, unit=1e12):
    """amount / time in `unit`s per second (TFLOP/s by default), None without a time."""
    return amount / (ms * 1e-3) / unit if ms else None


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
        for backend in _backends(device):
            fn = mode_fn(head_loss_fn(inp, cfg, backend), "full")
            prof, err = try_cuda(lambda: launch_profile(fn, grads))
            if prof and backend == "triton":
                nbytes = torch.finfo(DTYPES[dtype_name]).bits // 8
                annotate_launches(prof["launches"], head_launch_costs(s, nbytes))
            rows.append({"kernel": "head", "shape": shape_dict(s), "dtype": dtype_name, "mode": "full",
                         "backend": backend, "host_ms": host_ms(fn, grads), **(prof or {}), "error": err})
    return rows


# The fused head's Triton launches in launch order (kernels/hcd_head.py's plan), by kernel name.
FUSED_PLAN = {"_gemm_kernel": ("z_gemm", "dx_gemm", "dw_gemm"), "_head_row_kernel": ("row",)}


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


# ------------------------------------------------------------------------------------------------ steps

def bench_step_rows(device, quick=False) -> List[dict]:
    from hcd.engine.step_bench import step_rows
    return step_rows(device, quick=quick)


# ------------------------------------------------------------------------------------------------ report

def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def _ratio(a, b):
    return None if a is None or b is None else a / b


def format_table(rows: List[dict]) -> str:
    """The kernel table: launch-inclusive times and ratios; on CUDA also the fused call's host time and the
    device times from CUDA-graph replay, on which TFLOP/s, GB/s and the roofline fraction are computed."""
    gpu = any("device_ms" in r for r in rows)
    head = (f"{'kernel':7} {'B':>4} {'C':>5} {'n':>2} {'Dp':>4} {'Dt':>4} {'dtype':5} {'mode':8} {'eager':>8} {'compile':>8} "
            f"{'fused':>9} {'eag/fus':>7} {'cmp/fus':>7}")
    if gpu:
        head += (f" {'host':>6} | {'g.eager':>7} {'g.comp':>7} {'g.fused':>7} {'eag/fus':>7} {'cmp/fus':>7}"
                 f" {'TFLOP/s':>7} {'GB/s':>6} {'roof':>5}")
    head += f" {'mem MB':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        s = r["shape"]
        interp = r.get("interpreter")
        fused = _fmt(r["fused_ms"]) + ("i" if interp else "")
        ratios = (None, None) if interp else (_ratio(r["eager_ms"], r["fused_ms"]), _ratio(r["compile_ms"], r["fused_ms"]))
        dims = (s["Dp"], s["Dt"]) if r["kernel"] == "head" else ("", "")
        line = (f"{r['kernel']:7} {s['B']:>4} {s['C']:>5} {s['n']:>2} {dims[0]:>4} {dims[1]:>4} {r['dtype']:5} {r['mode']:8} "
                f"{_fmt(r['eager_ms']):>8} {_fmt(r['compile_ms']):>8} {fused:>9} {_fmt(ratios[0], '.2f'):>7} "
                f"{_fmt(ratios[1], '.2f'):>7}")
        if gpu:
            d = r.get("device_ms") or {}
            line += (f" {_fmt((r.get('host_ms') or {}).get('triton')):>6} | {_fmt(d.get('eager')):>7} "
                     f"{_fmt(d.get('compile')):>7} {_fmt(d.get('triton')):>7} "
                     f"{_fmt(_ratio(d.get('eager'), d.get('triton')), '.2f'):>7} "
                     f"{_fmt(_ratio(d.get('compile'), d.get('triton')), '.2f'):>7} "
                     f"{_fmt(r.get('device_tflops'), '.1f'):>7} {_fmt(r.get('device_gbps'), '.0f'):>6} "
                     f"{_fmt(r.get('roofline_fraction_device'), '.0%'):>5}")
        mem = (r.get("peak_mem_mb") or {}).get("triton")
        lines.append(line + f" {_fmt(mem, '.0f'):>6}")
    lines.append("times in ms (medians); 'i' = Triton interpreter on CPU, not a speed: left out of the ratios")
    if gpu:
        lines.append("left of '|': launch-inclusive (do_bench, L2 flushed, host time included); host = Python time to "
                     "issue the fused call; right of '|': device time per call from CUDA-graph replay (warm L2), the "
                     "base of TFLOP/s, GB/s and roof (the launch-inclusive roofline fraction is in the JSON)")
        failed = sorted({f"{b}: {e}" for r in rows for b, e in (r.get("device_errors") or {}).items()})
        lines += [f"graph capture failed, {e}" for e in failed]
    return "\n".join(lines)


def _launch_label(x: dict) -> str:
    if "plan" in x:
        return f"{x['plan']} {x['us']:.1f} ({x['tflops']:.1f} TFLOP/s, {x['gbps']:.0f} GB/s)"
    return f"{x['kernel']} {x['us']:.1f}"


def format_profile(rows: List[dict]) -> str:
    """Per backend: launches per call, summed kernel time, span of one call on the GPU and host time;
    then the fused path's launches in order."""
    if not rows:
        return ""
    s = rows[0]["shape"]  # one shape: the headline
    lines = [f"profile: head B={s['B']} C={s['C']} n={s['n']} Dp={s['Dp']} Dt={s['Dt']} full, "
             f"device time per call (torch.profiler); span = first kernel start to last kernel end",
             f"{'dtype':5} {'backend':8} {'launches':>8} {'kernel us':>9} {'span us':>8} {'host us':>8}"]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['dtype']:5} {r['backend']:8} profile failed: {r['error']}")
            continue
        n = r["per_call"] if r.get("per_call") else sum(x.get("count", 1) for x in r["launches"])
        lines.append(f"{r['dtype']:5} {r['backend']:8} {_fmt(n, '.0f'):>8} {r['kernel_us']:>9.1f} "
                     f"{_fmt(r.get('span_us'), '.1f'):>8} {r['host_ms'] * 1e3:>8.1f}")
    for r in rows:
        if r["backend"] == "triton" and not r.get("error"):
            lines.append(f"{r['dtype']} fused launches (us): " + ", ".join(_launch_label(x) for x in r["launches"]))
    return "\n".join(lines)


def kernel_plan(device, quick, dtypes: Optional[List[str]] = None, ns: Optional[List[int]] = None):
    """(kind, shape, dtype, mode, backends) for every row that fits this machine; dtypes / ns (CUDA) keep
    only those dtypes / those n of the head (a GPU plan in parts, each within one call's time limit)."""
    plan = []
    if device.type == "cuda":
        shapes = gpu_head_shapes(ns or ((4,) if quick else (2, 4, 8)), quick=quick)
        # the headline shape first, then the rest by size: a run cut short by a time limit has measured it
        first = headline_shape()
        shapes = sorted(shapes, key=lambda s: (s != first, -s.B * s.C, s.n != 4, s.n, -s.Dp, -s.Dt))
        dts = [d for d in (("bf16", "fp32") if quick and dtypes is None else ("bf16", "fp16", "fp32"))
               if dtypes is None or d in dtypes]
        for shape in shapes:
            for dt in dts:
                for mode in MODES:
                    plan.append(("head", shape, dt, mode, None))
        for shape in STUDENT_SHAPES:
            for dt in dts:
                plan.append(("student", shape, dt, "full", None))
        return plan
    shapes = CPU_SHAPES[:1] if quick else CPU_SHAPES
    for shape in shapes:
        for mode in (("full",) if quick else MODES):
            plan.append(("head", shape, "fp32", mode, ["eager", "compile"]))
    plan.append(("student", STUDENT_SHAPES[-1], "fp32", "full", ["eager", "compile"]))
    if os.environ.get("TRITON_INTERPRET") == "1":
        plan.append(("head", INTERPRETER_SHAPE, "fp32", "full", ["eager", "triton"]))
    return plan


def run_bench(device: Optional[str] = None, out_dir: str = "bench/results", quick: bool = False,
              steps: bool = True, loader: bool = True, dtypes: Optional[List[str]] = None,
              ns: Optional[List[int]] = None) -> int:
    """Run what fits this machine. Until the end the results go to <name>.partial.json, rewritten after
    every row ("complete": false), so a run cut short by a time limit keeps what it measured (`hcd bench
    --report FILE` prints it) and never replaces a finished file."""
    name = resolve_device(device, "bench")
    if name is None:
        return 2
    dev = torch.device(name)
    from tqdm import tqdm
    if (dtypes or ns) and dev.type != "cuda":
        print("hcd bench: error: --dtype/--n select parts of the CUDA plan; the CPU plan is small enough to run "
              "whole", file=sys.stderr)
        return 2
    bad = [d for d in dtypes or () if d not in DTYPES] + [str(n) for n in ns or () if n < 1]
    if bad:
        print(f"hcd bench: error: --dtype/--n: {', '.join(bad)} not among {', '.join(DTYPES)} / positive n",
              file=sys.stderr)
        return 2
    problem = output_path_problem(out_dir, directory=True)
    if problem:
        print(f"hcd bench: error: --out: {problem}", file=sys.stderr)
        return 2
    plan = kernel_plan(dev, quick, dtypes, ns)
    result = {"device": device_name(dev), "commit": commit(), "date": _dt.date.today().isoformat(),
              "versions": versions(), "complete": False, "kernel": [], "profile": [], "step": [], "loader": []}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    part = "".join(f"-{k}{','.join(map(str, v))}" for k, v in (("dtype", dtypes), ("n", ns)) if v)
    path = out / f"{device_name(dev).replace(' ', '_')}-{result['date']}{part}.json"
    partial = path.with_name(path.stem + ".partial.json")  # until complete: never replaces a finished file
    group = None
    for kind, shape, dt, mode, backends in tqdm(plan, desc="kernels", leave=False):
        # torch.compile's graphs are shared by the modes of one (kernel, shape, dtype); dynamo's cache is
        # cleared between groups (past its recompile limit it would silently run eagerly)
        fresh = group != (kind, shape, dt)
        group = (kind, shape, dt)
        result["kernel"].append(bench_kernel_row(kind, shape, dt, mode, dev, quick, backends, fresh_compile=fresh))
        write_json(partial, result)
    subset = bool(dtypes or ns)  # a part of the kernel plan: the rest was (or will be) measured elsewhere
    result["profile"] = [] if subset else profile_rows(dev)
    write_json(partial, result)
    if steps and not subset:
        result["step"] = bench_step_rows(dev, quick)
        write_json(partial, result)
    if loader and dev.type == "cpu":
        result["loader"] = loader_rows(quick)
    result["complete"] = True
    write_json(path, result)
    partial.unlink(missing_ok=True)
    print(report(result))
    print(f"wrote {path}")
    return 0


def report(result: dict) -> str:
    """Every table of one results JSON."""
    parts = [format_table(result["kernel"])] if result.get("kernel") else []
    if result.get("profile"):
        parts.append(format_profile(result["profile"]))
    if result.get("step"):
        parts.append(format_step_table(result["step"]))
    if result.get("loader"):
        parts.append("\n".join(f"loader {r['loader']:6} {r['split']:5} {r['images_per_s']:7.0f} img/s "
                               f"({r['workers']} workers)" for r in result["loader"]))
    if result.get("complete") is False:
        parts.append("(incomplete: the run stopped before its last section)")
    return "\n".join(parts)


def run_report(path: str) -> int:
    """`hcd bench --report FILE`: print the tables of a results JSON."""
    p = Path(path)
    try:
        result = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        print(f"hcd bench: error: --report {path}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(result, dict) or not isinstance(result.get("kernel"), list):
        print(f"hcd bench: error: --report {path}: not an hcd bench results file (no \"kernel\" list)",
              file=sys.stderr)
        return 2
    print(f"{result.get('device')}  commit {result.get('commit')}  {result.get('date')}")
    print(report(result))
    return 0


def loader_rows(quick) -> List[dict]:
    from hcd.engine.loader_bench import loader_rows as rows
    return rows(quick=quick)


def format_step_table(rows: List[dict]) -> str:
    lines = [f"{'step':28} {'ms':>9} {'vs eager':>8} {'vs KD':>6}"]
    for r in rows:
        lines.append(f"{r['name']:28} {r['ms']:>9.2f} {_fmt(r.get('vs_eager'), '.2f'):>8} "
                     f"{_fmt(r.get('vs_kd'), '.2f'):>6}")
    return "\n".join(lines)
