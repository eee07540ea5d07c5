"""`hcd bench`: fused vs eager vs torch.compile for the loss kernels and whole training steps.

Prints a table of ratios, achieved TFLOP/s and GB/s against the card's roofline and peak memory, and writes
runs/bench/<device>-<date>.json (--out). On CPU the shapes are small and the Triton path (which would run in the
interpreter) is timed at a tiny shape only, marked "interpreter" and left out of every ratio.
Timing (timing.py): launch-inclusive medians (CUDA events on CUDA, a timed loop on CPU) for every backend;
on CUDA also the host's issue time of the fused call, device time from CUDA-graph replay (the roofline's
base) and, for the headline shape, a per-launch profile of every backend (profile.py); fp32 rows also time
the eager and compile baselines with TF32 allowed. Step rows (step_rows.py): the trainer's own micro-step
on the DeepSpeed engine against the reference loop a user would write and a KD step, with a breakdown.
"""
import datetime as _dt
import os
import sys
from pathlib import Path
from typing import List, Optional

import torch

from hcd.engine.bench.kernel_rows import bench_kernel_row
from hcd.engine.bench.plan import DTYPES, kernel_plan
from hcd.engine.bench.profile import profile_rows
from hcd.engine.bench.report import report
from hcd.engine.errors import output_path_problem
from hcd.engine.runinfo import commit, device_name, resolve_device, versions, write_json


SECTIONS = ("kernel", "profile", "step", "loader")


def run_bench(device: Optional[str] = None, out_dir: str = "runs/bench", quick: bool = False,
              steps: bool = True, loader: bool = True, dtypes: Optional[List[str]] = None,
              ns: Optional[List[int]] = None, only: Optional[List[str]] = None) -> int:
    """Run what fits this machine (`only`: these SECTIONS alone). Until the end the results go to
    <name>.partial.json, rewritten after every row ("complete": false), so a run cut short by a time limit
    keeps what it measured (`hcd bench --report FILE` prints it) and never replaces a finished file."""
    name = resolve_device(device, "bench")
    if name is None:
        return 2
    dev = torch.device(name)
    problem = _argument_problem(dev, out_dir, dtypes, ns, only)
    if problem:
        print(f"hcd bench: error: {problem}", file=sys.stderr)
        return 2
    subset = bool(dtypes or ns)  # a part of the kernel plan: the rest was (or will be) measured elsewhere
    sections = {"kernel"} if subset else set(only or SECTIONS)
    plan = kernel_plan(dev, quick, dtypes, ns) if "kernel" in sections else []
    # the load average says whether the machine was busy with other work while it was measured
    result = {"device": device_name(dev), "commit": commit(), "date": _dt.date.today().isoformat(),
              "versions": versions(), "load_average": {"start": os.getloadavg()}, "complete": False,
              "kernel": [], "profile": [], "step": [], "loader": []}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    part = "".join(f"-{k}{','.join(map(str, v))}" for k, v in (("dtype", dtypes), ("n", ns), ("only", only)) if v)
    path = out / f"{device_name(dev).replace(' ', '_')}-{result['date']}{part}.json"
    partial = path.with_name(path.stem + ".partial.json")  # until complete: never replaces a finished file
    _kernel_rows(plan, result, partial, dev, quick)
    result["profile"] = profile_rows(dev) if "profile" in sections else []
    write_json(partial, result)
    if steps and "step" in sections:
        from hcd.engine.bench import step_rows as sr  # timm, DeepSpeed, the trainer: only when steps run
        missing = sr.deepspeed_missing()
        if missing:
            _phase(f"training steps left out: {missing}")
        else:
            _phase("training steps: the reference loop, the engine step (DeepSpeed) and a KD step, each built "
                   "then timed")
            result["step"] = sr.step_rows(dev, quick=quick,
                                          on_row=lambda rows: write_json(partial, dict(result, step=rows)))
            write_json(partial, result)
    if loader and "loader" in sections and dev.type == "cpu":
        from hcd.engine.bench.loader_rows import loader_rows  # PIL, the data pipelines: only when loaders run
        _phase("loaders: writing a JPEG folder, then one pass of each loader over it")
        result["loader"] = loader_rows(quick=quick)
    result["load_average"]["end"] = os.getloadavg()
    result["complete"] = True
    write_json(path, result)
    partial.unlink(missing_ok=True)
    print(report(result))
    print(f"wrote {path}")
    return 0


def _phase(text: str) -> None:
    print(f"hcd bench: {text} ...", file=sys.stderr, flush=True)


def _argument_problem(dev, out_dir, dtypes, ns, only) -> Optional[str]:
    if (dtypes or ns) and dev.type != "cuda":
        return "--dtype/--n select parts of the CUDA plan; the CPU plan is small enough to run whole"
    if (dtypes or ns) and only:
        return "--only with --dtype/--n: a part of the kernel plan runs kernel rows alone"
    unknown = [s for s in only or () if s not in SECTIONS]
    if unknown:
        return f"--only: {', '.join(unknown)} not among {', '.join(SECTIONS)}"
    bad = [d for d in dtypes or () if d not in DTYPES] + [str(n) for n in ns or () if n < 1]
    if bad:
        return f"--dtype/--n: {', '.join(bad)} not among {', '.join(DTYPES)} / positive n"
    problem = output_path_problem(out_dir, directory=True)
    return f"--out: {problem}" if problem else None


def _kernel_rows(plan: list, result: dict, partial: Path, dev, quick) -> None:
    """Every row of the plan into result["kernel"], the partial file rewritten after each."""
    from tqdm import tqdm
    group = None
    for kind, shape, dt, mode, backends in tqdm(plan, desc="kernels", leave=False):
        # torch.compile's graphs are shared by the modes of one (kernel, shape, dtype); dynamo's cache is
        # cleared between groups (past its recompile limit it would silently run eagerly)
        fresh = group != (kind, shape, dt)
        group = (kind, shape, dt)
        result["kernel"].append(bench_kernel_row(kind, shape, dt, mode, dev, quick, backends, fresh_compile=fresh))
        write_json(partial, result)
