"""`hcd bench`: fused vs eager vs torch.compile for the loss kernels and whole training steps.

Prints a table of ratios, achieved TFLOP/s and GB/s against the card's roofline and peak memory, and writes
bench/results/<device>-<date>.json. On CPU the shapes are small and the Triton path (which would run in the
interpreter) is timed at a tiny shape only, marked "interpreter" and left out of every ratio.
Timing: triton.testing.do_bench medians on CUDA; medians of a timed loop on CPU.
"""
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch

from kernels import HCDLossConfig, hcd_head_loss, student_loss
from kernels.compare import Case, make_inputs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("forward", "backward", "full")

# Dense peaks (TFLOP/s without sparsity; fp32 = non-tensor-core IEEE, what torch uses by default) and HBM GB/s.
ROOFLINES = {
    "H100": {"tflops": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0}, "gbps": 3350.0},
    "H200": {"tflops": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0}, "gbps": 4800.0},
    "A100": {"tflops": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0}, "gbps": 2039.0},
}


# CIFAR-100: Swin-T (Dt 768) -> ResNet18 (Ds 512): Dp 768. ImageNet: Swin-T -> ResNet18 at B 256 per GPU.
# Inputs come from kernels.compare.make_inputs: the same generator the tests and `hcd verify` use.
GPU_SHAPES = [Case(128, 100, n, 768, 768) for n in (2, 4, 8)] + [Case(256, 1000, n, 768, 768) for n in (2, 4, 8)]
CPU_SHAPES = [Case(64, 100, 4, 256, 192), Case(128, 100, 4, 768, 768)]
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


def head_cost(shape: Case, dtype_bytes: int, mode: str):
    """(FLOP, bytes) of one stage's head in `mode`, from the fused launch plan's own model."""
    from kernels.hcd_head import head_flops_bytes
    return _mode_cost(head_flops_bytes(shape.B, shape.C, shape.n, shape.Dp, shape.Dt, dtype_bytes), mode)


def student_cost(B: int, C: int, dtype_bytes: int, mode: str):
    from kernels.student import student_flops_bytes
    return _mode_cost(student_flops_bytes(B, C, dtype_bytes), mode)


def roofline_for(device: torch.device) -> Optional[dict]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in ROOFLINES.items() if k in name), None)


# ------------------------------------------------------------------------------------------------ timing

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
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


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
                     backends=None) -> dict:
    """One table row: medians per backend, achieved TFLOP/s and GB/s of the fused path, peak memory."""
    cfg = HCDLossConfig(n_sublogits=shape.n)
    dtype = DTYPES[dtype_name]
    inp = make_inputs(shape, dtype, device)
    make = head_loss_fn if kind == "head" else student_loss_fn
    grads = grad_tensors(inp)
    ms, mem = {}, {}
    torch._dynamo.reset()  # one compiled graph per row: past dynamo's recompile limit it would run eagerly
    for backend in backends or _backends(device):
        with _no_donated_buffers():
            fn = mode_fn(make(inp, cfg, backend), mode)
            ms[backend] = time_ms(fn, device, grad_to_none=grads, quick=quick)
            mem[backend] = peak_mem_mb(fn, device)
        for t in grads:
            t.grad = None
    interp = device.type == "cpu" and "triton" in ms
    nbytes = torch.finfo(dtype).bits // 8
    flops, nbytes_moved = (head_cost(shape, nbytes, mode) if kind == "head"
                           else student_cost(shape.B, shape.C, nbytes, mode))
    fused = ms.get("triton")
    row = {"kernel": kind, "shape": shape_dict(shape), "dtype": dtype_name, "mode": mode,
           "eager_ms": ms.get("eager"), "compile_ms": ms.get("compile"), "fused_ms": fused,
           "fused_tflops": flops / (fused * 1e-3) / 1e12 if fused and not interp else None,
           "fused_gbps": nbytes_moved / (fused * 1e-3) / 1e9 if fused and not interp else None,
           "peak_mem_mb": mem, "interpreter": interp}
    roof = roofline_for(device)
    if roof and fused:
        t_roof = max(flops / (roof["tflops"][dtype_name] * 1e12), nbytes_moved / (roof["gbps"] * 1e9))
        row["roofline_fraction"] = t_roof / (fused * 1e-3)
    return row


# ------------------------------------------------------------------------------------------------ steps

def bench_step_rows(device, quick=False) -> List[dict]:
    from engine.step_bench import step_rows
    return step_rows(device, quick=quick)


# ------------------------------------------------------------------------------------------------ report

def versions() -> dict:
    from importlib import metadata
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "timm", "deepspeed", "nvidia-dali-cuda120"):  # metadata only: imports nothing
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            v[dist] = None
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
    return v


def commit() -> str:
    """The checkout's short hash (+ "-dirty"); HCD_COMMIT when the tree travelled without .git (a GPU box)."""
    if os.environ.get("HCD_COMMIT"):
        return os.environ["HCD_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{os.cpu_count()}core"


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def _ratio(a, b):
    return None if a is None or b is None else a / b


def format_table(rows: List[dict]) -> str:
    head = (f"{'kernel':7} {'B':>4} {'C':>5} {'n':>2} {'dtype':5} {'mode':8} {'eager':>9} {'compile':>9} "
            f"{'fused':>9} {'eag/fus':>7} {'cmp/fus':>7} {'TFLOP/s':>8} {'GB/s':>7} {'roof':>5} {'mem MB':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        s = r["shape"]
        interp = r.get("interpreter")
        fused = _fmt(r["fused_ms"]) + ("i" if interp else "")
        ratios = (None, None) if interp else (_ratio(r["eager_ms"], r["fused_ms"]), _ratio(r["compile_ms"], r["fused_ms"]))
        mem = (r.get("peak_mem_mb") or {}).get("triton")
        lines.append(f"{r['kernel']:7} {s['B']:>4} {s['C']:>5} {s['n']:>2} {r['dtype']:5} {r['mode']:8} "
                     f"{_fmt(r['eager_ms']):>9} {_fmt(r['compile_ms']):>9} {fused:>9} {_fmt(ratios[0], '.2f'):>7} "
                     f"{_fmt(ratios[1], '.2f'):>7} {_fmt(r.get('fused_tflops'), '.1f'):>8} "
                     f"{_fmt(r.get('fused_gbps'), '.0f'):>7} {_fmt(r.get('roofline_fraction'), '.0%'):>5} "
                     f"{_fmt(mem, '.0f'):>7}")
    lines.append("times in ms (medians); 'i' = Triton interpreter on CPU, not a speed: left out of the ratios")
    return "\n".join(lines)


def kernel_plan(device, quick):
    """(kind, shape, dtype, mode, backends) for every row that fits this machine."""
    plan = []
    if device.type == "cuda":
        shapes = GPU_SHAPES if not quick else [s for s in GPU_SHAPES if s.n == 4]
        dtypes = ("bf16", "fp32") if quick else ("bf16", "fp16", "fp32")
        for shape in shapes:
            for dt in dtypes:
                for mode in MODES:
                    plan.append(("head", shape, dt, mode, None))
        for shape in STUDENT_SHAPES:
            for dt in dtypes:
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
              steps: bool = True, loader: bool = True) -> int:
    from engine.verify import resolve_device
    name = resolve_device(device, "bench")
    if name is None:
        return 2
    dev = torch.device(name)
    from tqdm import tqdm
    plan = kernel_plan(dev, quick)
    rows = [bench_kernel_row(kind, shape, dt, mode, dev, quick, backends)
            for kind, shape, dt, mode, backends in tqdm(plan, desc="kernels", leave=False)]
    step = bench_step_rows(dev, quick) if steps else []
    loads = loader_rows(quick) if loader and dev.type == "cpu" else []
    result = {"device": device_name(dev), "commit": commit(), "date": _dt.date.today().isoformat(),
              "versions": versions(), "kernel": rows, "step": step, "loader": loads}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{device_name(dev).replace(' ', '_')}-{result['date']}.json"
    tmp = out / (name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / name)
    print(format_table(rows))
    if step:
        print(format_step_table(step))
    if loads:
        print("\n".join(f"loader {r['loader']:6} {r['split']:5} {r['images_per_s']:7.0f} img/s "
                        f"({r['workers']} workers)" for r in loads))
    print(f"wrote {out / name}")
    return 0


def loader_rows(quick) -> List[dict]:
    from engine.loader_bench import loader_rows as rows
    return rows(quick=quick)


def format_step_table(rows: List[dict]) -> str:
    lines = [f"{'step':28} {'ms':>9} {'vs eager':>8} {'vs KD':>6}"]
    for r in rows:
        lines.append(f"{r['name']:28} {r['ms']:>9.2f} {_fmt(r.get('vs_eager'), '.2f'):>8} "
                     f"{_fmt(r.get('vs_kd'), '.2f'):>6}")
    return "\n".join(lines)
