"""The tables `hcd bench` prints, from the rows of a results JSON (a finished run's, or `--report FILE`'s)."""
import json
import sys
from pathlib import Path
from typing import List


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
        dims = (s["Dp"], s["Dt"]) if r["kernel"] != "student" else ("", "")
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
    lines.append("times in ms (medians)")
    loss = [r for r in rows if r["kernel"] == "loss"]
    if loss:
        lines.append(f"loss = hcd_loss, the whole loss of a step: {loss[0].get('stages', 4)} heads of the shape + the "
                     "student terms in one call (compile: torch.compile of the reference loss)")
    if any(r.get("interpreter") for r in rows):
        lines.append("'i' = Triton interpreter on CPU, not a speed: left out of the ratios")
    elif not gpu:
        lines.append("fused '-': the Triton kernels run on CUDA; on CPU only in the interpreter (TRITON_INTERPRET=1 "
                     "set before the command), at one tiny shape and marked 'i'")
    if gpu:
        lines.append("left of '|': launch-inclusive (CUDA events, L2 flushed, host time included); host = Python time to "
                     "issue the fused call; right of '|': device time per call from CUDA-graph replay (warm L2), the "
                     "base of TFLOP/s, GB/s and roof (the launch-inclusive roofline fraction is in the JSON)")
        failed = sorted({f"{b}: {e}" for r in rows for b, e in (r.get("device_errors") or {}).items()})
        lines += [f"graph capture failed, {e}" for e in failed]
    return "\n".join(lines)


def _loss_target_line(r: dict) -> str:
    s, d = r["shape"], r.get("device_ms") or {}
    return (f"{'loss':10} {s['B']:>4} {s['C']:>5} {s['n']:>2} {s['Dp']:>4} {s['Dt']:>4} {r['dtype']:5} "
            f"{_fmt(d.get('triton')):>7} {_fmt(r.get('floor_ms'), '.4f'):>7} "
            f"{_fmt(r.get('fused_over_floor'), '.2f'):>7} {_fmt(d.get('compile')):>7} "
            f"{_fmt(r.get('compile_over_fused'), '.2f'):>7} {_fmt((r.get('device_tf32_ms') or {}).get('compile')):>8} "
            f"{_fmt(r.get('compile_tf32_over_fused'), '.2f'):>7}")


def format_loss_targets(rows: List[dict]) -> str:
    """The whole-loss rows measured on a GPU against issue 14's targets, device time (CUDA-graph replay):
    fused <= 2x its device-time floor, torch.compile of the reference loss >= 2x fused (IEEE and TF32)."""
    head = (f"{'whole loss':10} {'B':>4} {'C':>5} {'n':>2} {'Dp':>4} {'Dt':>4} {'dtype':5} {'g.fused':>7} {'floor':>7} "
            f"{'fus/flr':>7} {'g.comp':>7} {'cmp/fus':>7} {'g.c.tf32':>8} {'ctf/fus':>7}")
    body = [_loss_target_line(r) for r in rows if r["kernel"] == "loss" and "device_ms" in r]
    note = ("issue 14 targets, device ms per call (CUDA-graph replay): fus/flr <= 2 (floor: the cost model at the "
            "card's peak FLOP/s and bandwidth, engine/bench/roofline.py), cmp/fus and ctf/fus >= 2 (torch.compile "
            "of the reference loss, IEEE fp32 / TF32 allowed: fp32 rows only)")
    return "\n".join([head, "-" * len(head), *body, note]) if body else ""


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


def format_tf32_table(rows: List[dict]) -> str:
    """fp32 rows on CUDA: the eager and compile baselines with IEEE fp32 GEMMs (the main table) and with
    TF32 allowed, against the fused path (whose backward GEMMs use TF32 dots)."""
    rows = [r for r in rows if "eager_tf32_ms" in r]
    if not rows:
        return ""
    head = (f"{'fp32 rows':9} {'B':>4} {'C':>5} {'n':>2} {'mode':8} {'eager':>7} {'e.tf32':>7} {'compile':>7} "
            f"{'c.tf32':>7} {'fused':>7} {'ctf/fus':>7} | {'g.c.tf32':>8} {'g.fused':>7} {'ctf/fus':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        s, d, dt = r["shape"], r.get("device_ms") or {}, r.get("device_tf32_ms") or {}
        lines.append(f"{r['kernel']:9} {s['B']:>4} {s['C']:>5} {s['n']:>2} {r['mode']:8} {_fmt(r['eager_ms']):>7} "
                     f"{_fmt(r['eager_tf32_ms']):>7} {_fmt(r['compile_ms']):>7} {_fmt(r['compile_tf32_ms']):>7} "
                     f"{_fmt(r['fused_ms']):>7} {_fmt(_ratio(r['compile_tf32_ms'], r['fused_ms']), '.2f'):>7} | "
                     f"{_fmt(dt.get('compile')):>8} {_fmt(d.get('triton')):>7} "
                     f"{_fmt(_ratio(dt.get('compile'), d.get('triton')), '.2f'):>7}")
    lines.append("e./c.tf32: eager / torch.compile with TF32 allowed for float32 matmuls (allow_tf32, "
                 "float32_matmul_precision 'high'); eager/compile: IEEE fp32; g.: device time (CUDA-graph replay)")
    return "\n".join(lines)


def format_step_table(rows: List[dict]) -> str:
    """Step rows: ms per step, images/s, the engine's ratios; then the engine step's breakdown by range."""
    setup = rows[0].get("setup") or {}
    title = (f"step: {setup['config']} {setup.get('precision', '')} ZeRO-{setup.get('zero_stage', '?')}, synthetic "
             f"batch on the device, loss backend {setup.get('loss_backend', '?')}" if "config" in setup else
             "step rows of an earlier hcd bench (its own loop, no DeepSpeed; HCD/KD from its vs_kd)")
    lines = [title, f"{'step':52} {'ms/step':>9} {'images/s':>9} {'vs ref':>6} {'HCD/KD':>6}"]
    for r in rows:
        lines.append(f"{r['name']:52} {r['ms']:>9.2f} {_fmt(r.get('images_per_s'), '.1f'):>9} "
                     f"{_fmt(r.get('vs_reference'), '.2f'):>6} {_fmt(r.get('hcd_vs_kd', r.get('vs_kd')), '.2f'):>6}")
    for r in rows:  # a row of another config than the title's (the vit recipe row)
        other = (r.get("setup") or {}).get("config")
        if "config" in setup and other and other != setup["config"]:
            s = r["setup"]
            lines.append(f"{r['kind']}: {other} {s.get('precision', '')} ZeRO-{s.get('zero_stage', '?')}, with its "
                         "batch augmentation and EMA")
    lines.append("vs ref: images/s over the reference loop's (eager losses, autocast bf16 on CUDA, NCHW, no compile, "
                 "plain SGD, no DeepSpeed); HCD/KD: ms over the KD step's (same machinery, no heads)")
    for r in rows:
        if r.get("breakdown"):
            lines.append(f"breakdown of one {r['kind']} step (median of marked steps): {'host ms':>8} {'device ms':>9}")
            lines += [f"  {name:46} {_fmt(v['host_ms'], '.2f'):>8} {_fmt(v['device_ms'], '.2f'):>9}"
                      for name, v in r["breakdown"].items()]
    return "\n".join(lines)


def report(result: dict) -> str:
    """Every table of one results JSON."""
    parts = [format_table(result["kernel"])] if result.get("kernel") else []
    for table in (format_tf32_table, format_loss_targets):
        if table(result.get("kernel") or []):
            parts.append(table(result["kernel"]))
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
