"""`hcd verify`: the fused Triton losses against the float64 reference on this machine's device.

Losses: one stage's head, the student terms, hcd_loss, and the baselines dkd / dist / ofa (their loss and
student gradient, teacher frozen); the three HCD losses also on (B, C) soft targets (shape "soft").
CUDA (when present): fp32, fp16, bf16. CPU: the Triton interpreter, fp32 and fp16 (bf16 tl.dot is wrong
under the interpreter). The interpreter must be chosen before triton is
imported, so on CPU this sets TRITON_INTERPRET=1 itself, or re-runs `python -m hcd.engine.cli verify` in a
child process when triton was already imported without it (on CUDA it clears the variable the same way).
Pass rule and margins: kernels/testing.py. Imports only torch, triton (through kernels), kernels and
hcd.engine.runinfo's version helpers: no DeepSpeed, DALI, timm.
"""
import os
import subprocess
import sys
import time

import torch

from hcd.engine.errors import output_path_problem
from hcd.engine.runinfo import commit, resolve_device, versions, write_json

# (name, Case kwargs, quick?). The ImageNet head takes ~1-2 minutes in the CPU interpreter: full run only.
# hcd_loss (the one-call loss, 2 stages + the student, teacher side frozen) costs ~2.5 heads: in the CPU
# interpreter it runs at the first shape only (~30 s; the CIFAR shape would add ~3 minutes), and so do the
# baselines dkd, dist, ofa (~3 s each per dtype there; the CIFAR shape would add ~35 s).
SHAPES = [
    ("odd", dict(B=47, C=123, n=3, Dp=40, Dt=24, teacher_grad=True), True),
    ("cifar", dict(B=128, C=100, n=4, Dp=512, Dt=384), True),
    ("imagenet", dict(B=256, C=1000, n=4, Dp=768, Dt=768), False),
    # soft targets (docs/method.md, Soft targets): timm-style mixup rows, the HCD losses only (the baselines
    # read argmax(t), i.e. labels); B halved to keep the interpreter at ~20 s per dtype
    ("soft", dict(B=23, C=123, n=3, Dp=40, Dt=24, teacher_grad=True, soft="mixup"), True),
]

FIRST_SHAPE_ONLY = ("hcd_loss", "dkd", "dist", "ofa")  # in the CPU interpreter (and at the soft shape)
INTERPRETER_SHAPES = ("odd", "soft")  # the shapes FIRST_SHAPE_ONLY losses run at in the interpreter
SOFT_LOSSES = ("head", "student", "hcd_loss")


def _reexec(device, quick, interpret, json_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "hcd.engine.cli", "verify", "--device", device] + (["--quick"] if quick else [])
    cmd += ["--json", json_path] if json_path else []
    return subprocess.call(cmd, env=env)


def run_verify(device=None, quick=False, json_path=None) -> int:
    """Print the pass/fail table; with json_path also write it as a record (device, versions, commit, every
    output's error and tolerance), written atomically at the end."""
    device = resolve_device(device)
    if device is None:
        return 2
    problem = output_path_problem(json_path, directory=False) if json_path else None
    if problem:
        print(f"hcd verify: error: --json: {problem}", file=sys.stderr)
        return 2
    # CPU needs the interpreter; CUDA must not use it (it would run bf16 dots wrongly, and slowly).
    interpret = device == "cpu"
    if (os.environ.get("TRITON_INTERPRET") == "1") != interpret:
        if "triton" in sys.modules:  # too late to switch this process
            return _reexec(device, quick, interpret, json_path)
        if interpret:
            os.environ["TRITON_INTERPRET"] = "1"
        else:
            os.environ.pop("TRITON_INTERPRET", None)

    from hcd.kernels import HCDLossConfig
    from hcd.kernels.testing import Case, check_baseline, check_head, check_loss, check_student

    def baseline(loss):  # the baselines at the engine's defaults (testing.BASELINE_DEFAULTS), teacher frozen
        return lambda case, cfg, dtype, **kw: check_baseline(loss, case, dtype, **kw)
    checks = (("head", check_head), ("student", check_student), ("hcd_loss", check_loss),
              ("dkd", baseline("dkd")), ("dist", baseline("dist")), ("ofa", baseline("ofa")))

    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.startswith("cuda") else [])
    cfg = HCDLossConfig()
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU, Triton interpreter"
    print(f"hcd verify: fused Triton vs float64 reference on {where}; defaults of HCDLossConfig and of "
          f"dkd/dist/ofa_loss, grad_output 2.5")
    print("pass: max|ours-fp64| <= max|eager same dtype-fp64| + margin*max|fp64|  (kernels/testing.py)")
    header = f"{'shape':<9} {'loss':<8} {'dtype':<9} {'output':<6} {'max_abs':>10} {'max_rel':>10} {'tol':>10}  result"
    print(header)
    print("-" * len(header))
    failed, record = 0, []
    for name, kw, in_quick in SHAPES:
        if quick and not in_quick:
            continue
        case = Case(**kw)
        for dtype in dtypes:
            for loss, check in checks:
                if loss in FIRST_SHAPE_ONLY and interpret and name not in INTERPRETER_SHAPES:
                    continue
                if case.soft and loss not in SOFT_LOSSES:
                    continue
                t0 = time.perf_counter()
                rows = check(case, cfg, dtype, device=device, backend="triton", grad_scale=2.5)
                secs = time.perf_counter() - t0
                dname = str(dtype).replace("torch.", "")
                for i, r in enumerate(rows):
                    failed += not r.ok
                    record.append({"shape": name, "case": case.label(), "loss": loss, "dtype": dname, "output": r.output,
                                   "max_abs": r.max_abs, "max_rel": r.max_rel, "tol": r.tol, "ok": r.ok,
                                   "seconds": secs if i == 0 else None})
                    tag = f"{'ok' if r.ok else 'FAIL'}" + (f"  ({secs:.1f}s)" if i == 0 else "")
                    print(f"{name:<9} {loss:<8} {dname:<9} {r.output:<6} "
                          f"{r.max_abs:>10.3e} {r.max_rel:>10.3e} {r.tol:>10.3e}  {tag}")
    if quick:
        print("(--quick: the ImageNet shape B=256 C=1000 n=4 Dp=Dt=768 is skipped; run without --quick for it)")
    print(f"hcd verify: {'FAILED: ' + str(failed) + ' output(s) outside tolerance' if failed else 'all outputs pass'}")
    if json_path:
        _write_record(json_path, where, quick, failed, record)
    return 1 if failed else 0


def _write_record(path, where, quick, failed, rows):
    import datetime
    from pathlib import Path

    out = {"device": where, "commit": commit(), "date": datetime.date.today().isoformat(), "versions": versions(),
           "rule": "max|ours-fp64| <= max|eager same dtype-fp64| + margin*max|fp64| (kernels/testing.py)",
           "quick": quick, "passed": failed == 0, "failed": failed, "rows": rows}
    write_json(Path(path), out)
    print(f"wrote {path}")
