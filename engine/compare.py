"""`hcd compare`: every (method, seed) of one config under one recipe, then the table and the curves.

Each run is the config with `method=M`, `seed=S` and nothing else changed, in DIR/M/seed-S, trained one after
another in this process (a subprocess would pay the torch + timm + DeepSpeed imports, about 7 s, per run; the
process group made by the first run is reused by the next, and build_distiller and train() seed everything a run
draws). Resumable: a finished run (its final evaluation, export and curves written) is skipped, an interrupted
one with a checkpoint continues from it (as `hcd train --resume`), one that stopped before its first checkpoint
starts again. After every run: DIR/compare.json and DIR/compare.md (atomic); at the end DIR/compare.png.
Under torchrun every run uses all the processes; rank 0 alone clears folders, prints and writes the results,
and the ranks meet at a barrier before each run.

The statistics are pure functions of the runs' metrics.jsonl rows (run_summary, method_summary, markdown).
"""
import dataclasses
import gc
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from hcd.engine.config import check_paths, load_config, validate, with_absolute_paths
from hcd.engine.config_tree import ConfigError
from hcd.engine.errors import EXIT_STOPPED
from hcd.engine.loss_config import METHODS
from hcd.engine.metrics import read_metrics
from hcd.engine.runinfo import write_json

RUN_RECORD = "compare-run.json"   # in a run folder: the wall time `hcd compare` spent on it, over all attempts
COLUMNS = (("best_top1", "best top-1 %", 2), ("last_top1", "last top-1 %", 2), ("best_top5", "best top-5 %", 2),
           ("last_top5", "last top-5 %", 2), ("images_per_s", "images/s", 0), ("wall_s", "wall s", 0))


def parse_methods(text: str) -> list:
    """'ce,kd,hcd' -> ['ce', 'kd', 'hcd']; ValueError naming the bad entry (unknown, repeated, none)."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r} (choose from {','.join(METHODS)})")
    if len(set(methods)) != len(methods):
        raise ValueError(f"a method is listed twice in {text!r}")
    if not methods:
        raise ValueError("no method given")
    return methods


def mean_std(values: Sequence[float]) -> tuple:
    """(mean, sample standard deviation with n - 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0


def run_summary(rows: list, wall_s: float = float("nan")) -> dict:
    """One run's numbers from its metrics rows: best (max over evaluations) and last val top-1 / top-5, the
    mean images/s of its train rows, the teacher's top-1, and the val top-1 curve [(epoch, top1), ...]."""
    evals = [r for r in rows if r.get("kind") == "eval"]
    train = [r["images_per_s"] for r in rows if r.get("kind") == "train" and not r.get("partial")]
    teacher = [r["teacher_top1"] for r in rows if r.get("kind") == "teacher"]
    return {"best_top1": max(r["val_top1"] for r in evals), "last_top1": evals[-1]["val_top1"],
            "best_top5": max(r["val_top5"] for r in evals), "last_top5": evals[-1]["val_top5"],
            "images_per_s": sum(train) / len(train) if train else float("nan"), "wall_s": wall_s,
            "teacher_top1": teacher[-1] if teacher else None,
            "curve": [[r["epoch"], r["val_top1"]] for r in evals]}


def method_summary(runs: dict) -> dict:
    """{seed: run_summary} of one method -> {column: [mean, std]} over its seeds, and "seeds": n."""
    out = {"seeds": len(runs)}
    for key, _, _ in COLUMNS:
        out[key] = list(mean_std([r[key] for r in runs.values()]))
    return out


def _cell(digits: int, mean: float, std: Optional[float] = None) -> str:
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def markdown(result: dict) -> str:
    """compare.md: the per-method table (mean ± std over seeds), then every run's numbers."""
    head = "| " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    rule = "|---|---|" + "---:|" * len(COLUMNS)
    lines = [f"# hcd compare: {result['config']}", "",
             f"Teacher {result['teacher']}: val top-1 {_cell(2, result['teacher_top1'] or 0)} %. Student "
             f"{result['student']}. Seeds {result['seeds']}; commit {result['commit']}, {result['device']}; "
             f"wall time of the runs {result['wall_s'] / 60:.1f} min.", "",
             "Mean ± sample standard deviation (n − 1) over seeds; best = the highest of a run's evaluations, last "
             "= its final one; images/s = training throughput (evaluation and checkpoints excluded).", "",
             "| method | seeds " + head, rule]
    for m, s in result["summary"].items():
        lines.append(f"| {m} | {s['seeds']} | " + " | ".join(_cell(d, *s[k]) for k, _, d in COLUMNS) + " |")
    lines += ["", "Per run:", "", "| method | seed " + head, rule]
    for m, runs in result["runs"].items():
        for seed, r in runs.items():
            lines.append(f"| {m} | {seed} | " + " | ".join(_cell(d, r[k]) for k, _, d in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def is_finished(folder: Path, export: bool) -> bool:
    """The run ended: its last evaluation logged, then (train._finish) the export and curves.png written."""
    return ((folder / "curves.png").is_file() and (not export or (folder / "student.safetensors").is_file())
            and any(r.get("kind") == "eval" for r in read_metrics(folder / "metrics.jsonl")))


def config_difference(saved: dict, planned: dict, prefix: str = "") -> Optional[str]:
    """The first dotted key whose value differs between two config trees (dataclasses.asdict), or None."""
    for key in planned:
        a, b = saved.get(key), planned[key]
        if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
            found = config_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}"
    return None


def _check_same_config(folder: Path, cfg) -> None:
    """A run folder of this comparison holds a run of this very config: skipping or resuming a run of
    another recipe would mix two recipes in one table."""
    if not (folder / "config.yaml").is_file():
        return
    saved = dataclasses.asdict(load_config(str(folder / "config.yaml")))
    planned = dataclasses.asdict(with_absolute_paths(dataclasses.replace(cfg, out=str(folder))))
    key = config_difference(saved, planned)
    if key is not None:
        raise ConfigError(f"--out: {folder} holds a run whose {key} differs from this comparison's; choose "
                          "another --out (one comparison, one recipe)")


def _prepare(folder: Path) -> bool:
    """Whether the run in `folder` resumes (it has a checkpoint); a run that stopped before its first
    checkpoint is cleared so it starts again."""
    if _has_checkpoint(folder):
        return True
    for name in ("metrics.jsonl", "config.yaml", "tb", "checkpoints"):
        p = folder / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return False


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def load_base(config: str, overrides: tuple, methods: Sequence[str]):
    """The shared config: digits assets built when it names the digits cache, and a teacher required
    (every method but ce distils from it: a random teacher would make the table meaningless)."""
    from hcd.engine.demo import DIGITS_ROOT, prepare_digits
    cfg = load_config(config, overrides)
    if cfg.data.root == DIGITS_ROOT:
        prepare_digits(cfg)
    if set(methods) != {"ce"} and not cfg.model.teacher_checkpoint and not cfg.model.pretrained:
        raise ConfigError("model.teacher_checkpoint: not set and model.pretrained is false: every method but ce "
                          "would distil from a random teacher; name the teacher's checkpoint")
    check_paths(cfg)
    return with_absolute_paths(cfg)


def run_compare(config: str, methods: Sequence[str], seeds: int, out: Optional[str] = None, overrides: tuple = (),
                runner: Optional[Callable] = None) -> int:
    """Train every (method, seed) not finished yet, then write the table and the plot; the exit code."""
    if runner is None:
        from hcd.engine.trainer import train as runner
    from hcd.engine.distributed import distributed, init_process_group
    with distributed() as d:  # the group goes at exit, as after every command
        if d.world > 1:  # started here so the ranks can meet before the first run (train() reuses it)
            init_process_group(d)
        return _run_jobs(d, runner, config, methods, seeds, out, overrides)


def _run_jobs(d, runner, config, methods, seeds, out, overrides) -> int:
    """run_compare's loop on this process (d: its Dist)."""
    from hcd.engine.distributed import barrier
    say = print if d.rank == 0 else (lambda *a, **k: None)
    base = load_base(config, overrides, methods) if d.rank == 0 else None
    barrier()  # rank 0 built the digits assets, if any, before the others load the config
    base = base or load_base(config, overrides, methods)
    out = Path(out or base.out).expanduser()
    seed_list = list(range(base.seed, base.seed + seeds))
    jobs = [(m, s) for m in methods for s in seed_list]
    start, timed = time.perf_counter(), []
    for k, (m, s) in enumerate(jobs, 1):
        folder, tag = out / m / f"seed-{s}", f"[{k}/{len(jobs)}] {m} seed {s}"
        cfg = dataclasses.replace(base, method=m, seed=s)
        validate(cfg)
        _check_same_config(folder, cfg)
        barrier()  # every rank sees the folder as the previous run left it
        if is_finished(folder, base.train.export):
            say(f"{tag}: finished earlier, skipped ({_result(folder)})", flush=True)
            continue
        resume = folder.is_dir() and (_prepare(folder) if d.rank == 0 else _has_checkpoint(folder))
        barrier()  # rank 0 cleared a run that never checkpointed before anyone starts it
        left = len(jobs) - k + 1
        eta = f", ETA {_minutes(sum(timed) / len(timed) * left)}" if timed else ""
        say(f"{tag}: {'resuming' if resume else 'training'} in {folder} (elapsed "
            f"{_minutes(time.perf_counter() - start)}{eta})", flush=True)
        t0 = time.perf_counter()
        code = runner(cfg, out=str(folder), resume=resume)
        wall = time.perf_counter() - t0
        timed.append(wall)
        gc.collect()  # the finished run's engine, loaders and models
        if code != 0:
            again = "rerun the same command to continue" if code == EXIT_STOPPED else "see the error above"
            say(f"{tag}: hcd train exited {code}; {again} (finished runs are kept)", flush=True)
        if d.rank == 0:
            if folder.is_dir():
                write_json(folder / RUN_RECORD, {"wall_s": read_json(folder / RUN_RECORD).get("wall_s", 0.0) + wall})
            write_results(out, base, config, methods, seed_list)
        if code != 0:
            return code
        say(f"{tag}: done in {_minutes(wall)} ({_result(folder)})", flush=True)
    if d.rank == 0:
        result = write_results(out, base, config, methods, seed_list)
        from hcd.engine.plot import plot_compare
        plot_compare(result, out / "compare.png")
        print(markdown(result), flush=True)
        print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}", flush=True)
    return 0


def _has_checkpoint(folder: Path) -> bool:
    return (folder / "checkpoints" / "latest").is_file()


def read_json(path: Path) -> dict:
    import json
    return json.loads(path.read_text()) if path.is_file() else {}


def _result(folder: Path) -> str:
    r = run_summary(read_metrics(folder / "metrics.jsonl"))
    return f"val top-1 best {r['best_top1']:.2f} %, last {r['last_top1']:.2f} %, {r['images_per_s']:.0f} images/s"


def collect(out: Path, methods: Sequence[str], seeds: Sequence[int], export: bool) -> dict:
    """{method: {seed: run_summary}} of the finished runs under `out`."""
    runs = {}
    for m in methods:
        for s in seeds:
            folder = out / m / f"seed-{s}"
            if is_finished(folder, export):
                wall = read_json(folder / RUN_RECORD).get("wall_s", float("nan"))
                runs.setdefault(m, {})[s] = run_summary(read_metrics(folder / "metrics.jsonl"), wall)
    return runs


def write_results(out: Path, base, config: str, methods: Sequence[str], seeds: Sequence[int]) -> dict:
    """compare.json and compare.md of the runs finished so far (atomically); returns what compare.json holds."""
    import torch

    from hcd.engine.runinfo import commit, device_name, versions
    runs = collect(out, methods, seeds, base.train.export)
    done = [r for rs in runs.values() for r in rs.values()]
    result = {"config": config, "teacher": base.model.teacher, "student": base.model.student,
              "teacher_top1": next((r["teacher_top1"] for r in done), None), "methods": list(methods),
              "seeds": list(seeds), "commit": commit(),
              "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
              "versions": versions(), "wall_s": sum(r["wall_s"] for r in done if not math.isnan(r["wall_s"])),
              "summary": {m: method_summary(rs) for m, rs in runs.items()}, "runs": runs}
    write_json(out / "compare.json", result)
    tmp = out / ".compare.md.tmp"
    tmp.write_text(markdown(result))
    tmp.replace(out / "compare.md")
    return result
