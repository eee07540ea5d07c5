"""The distillation training loop on DeepSpeed (ZeRO 0-3), readable top to bottom: train() builds a Run, then
train_one_epoch() until the schedule, a stop request or train.stop_at_step ends it. The method (HCD or a
baseline, cfg.method) is the module inside the engine; nothing here depends on which one.

One micro-batch: loader -> images, labels on device -> frozen teacher (outside DeepSpeed) -> f_t, z_t ->
engine(images, labels, f_t, z_t) = student + the method's heads and losses -> engine.backward / engine.step.
Nothing in a step waits for the device: loss parts are summed on device (MetricWindow), a non-finite loss
turns its step into a no-op on the device (StepHealth), and the host reads both only for a log row or a
checkpoint. Stop requests are host flags, agreed between ranks in a gloo group at every optimizer step.
With train.ema_decay an EMA of the student follows every optimizer step and is evaluated, saved, resumed and
exported beside it (engine/ema.py).
"""
import dataclasses
import random
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hcd.engine.batchnorm import apply_sync_bn, distribute_bn
from hcd.engine.checkpoint import Checkpointer, NonFiniteState, read_layout, tag_for
from hcd.engine.config import Config, ConfigError, dump_config
from hcd.engine.distributed import Dist, build_engine, compute_dtype, control_group, distributed, rank0_print
from hcd.engine.errors import EXIT_STOPPED
from hcd.engine.ema import build_ema, resume_ema
from hcd.engine.evaluate import evaluate, evaluate_student
from hcd.engine.health import StepHealth, apply_found_inf, load_scaler_state, scaler_state
from hcd.engine.layout import check_resume_layout, check_run_folder, run_layout, with_legacy_shapes
from hcd.engine.metrics import MetricsLog, MetricWindow, read_metrics, write_metrics
from hcd.engine.signals import StopRequest
from hcd.engine.speed import input_layout, prepare_models, resolved
from hcd.engine.train_state import TrainState


@dataclass
class Run:
    """Everything one run's loop uses, built once by train()."""
    cfg: Config
    d: Dist
    folder: Path
    engine: object
    teacher: object                # images -> (f_t, z_t): the frozen teacher, compiled or not
    train_loader: object
    val_loader: object
    saver: Checkpointer
    log: MetricsLog
    window: MetricWindow
    total_steps: int
    state: TrainState
    pbar: object = None
    health: StepHealth = None
    control_group: object = None   # the process group that agrees on stop requests (host tensors, gloo)
    micro: int = 0                 # micro-batches in the current accumulation window
    channels_last: bool = False
    pending: Optional[int] = None  # an epoch that ended inside an accumulation window, handled at its end
    lr: float = 0.0
    teacher_top1: float = 0.0
    uses_teacher: bool = True      # false (method ce): no teacher forward in a step
    ema: object = None             # the EMA of the student (engine/ema.py), None with train.ema_decay off


def train(cfg: Config, out=None, resume: bool = False) -> int:
    """Distil cfg.model.student from cfg.model.teacher with cfg.method; returns the process exit code."""
    folder = Path(out or cfg.out).expanduser()
    cfg = dataclasses.replace(cfg, out=str(folder))  # the run's config.yaml names the folder it is in
    with distributed() as d:
        try:
            run = _build(cfg, folder, resume, d)
            with StopRequest() as stop:
                reason = None
                while run.state.step < run.total_steps and reason is None:
                    reason = train_one_epoch(run, stop)
            return _finish(run, reason)
        except NonFiniteState as e:
            print(f"hcd train: error: {e}", file=sys.stderr, flush=True)
            return 1


def _build(cfg: Config, folder: Path, resume: bool, d: Dist) -> Run:
    """Everything that can fail on bad input fails here, before the run folder exists or changes."""
    from tqdm import tqdm

    from hcd.engine.data import build_run_loaders
    from hcd.engine.distiller import build_distiller
    from hcd.engine.schedule import make_lr_lambda
    resume_tag = check_run_folder(folder, resume)
    teacher, distiller, mean, std = build_distiller(cfg, d.device, d.rank)
    ema = build_ema(cfg, distiller.student.model, d.device)  # from the initial fp32 weights, before DeepSpeed
    distiller = apply_sync_bn(distiller, cfg.train.sync_bn, d.device, d.world)
    teacher_fn = prepare_models(cfg, teacher, distiller, d.device)
    train_loader, val_loader = build_run_loaders(cfg, mean, std, d)
    t, batches = cfg.train, len(train_loader)
    if len(train_loader.classes) != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes}, but the data has "
                          f"{len(train_loader.classes)} classes")
    if t.grad_accum > batches:
        raise ConfigError(f"train.grad_accum: {t.grad_accum} exceeds the {batches} batches per epoch")
    # Accumulation windows run across epoch ends, so every epoch's batches are used even when grad_accum
    # does not divide them; steps per epoch is then fractional (the schedule converts epochs with it). The
    # schedule spans train.epochs; train.max_steps only stops the run earlier (as timm's).
    total_steps = min(batches * t.epochs // t.grad_accum, t.max_steps or sys.maxsize)
    layout = run_layout(cfg, d.world, distiller)
    from_world = None  # the world size of a checkpoint written by another number of processes
    if resume:  # before anything is written or loaded: a mismatch must leave the run as it is
        ckpt_dir = folder / "checkpoints"
        saved = with_legacy_shapes(read_layout(ckpt_dir, resume_tag), ckpt_dir, resume_tag, layout["parameters"])
        from_world = check_resume_layout(saved, layout, ckpt_dir / resume_tag)
    prior_rows = read_metrics(folder / "metrics.jsonl") if resume else []
    engine = build_engine(cfg, distiller, d, make_lr_lambda(cfg.schedule, cfg.optim.lr, t.epochs,
                                                            Fraction(batches, t.grad_accum)))
    if d.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if not resume:  # a resumed run's config.yaml is replaced once its checkpoint has loaded
            dump_config(cfg, folder / "config.yaml")
    seed = cfg.seed + d.rank  # per-rank randomness (the loaders derive the data order from cfg.seed)
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    window = MetricWindow(cfg.data.batch_size * d.world)
    run = Run(cfg, d, folder, engine, teacher_fn, train_loader, val_loader,
              Checkpointer(engine, folder / "checkpoints", d.rank, layout), None, window, total_steps, TrainState(),
              ema=ema)
    if resume:
        _resume(run, resume_tag, prior_rows, saved if from_world else None)
        resume_ema(ema, engine.module.student.model, run.saver.dir, resume_tag, lambda line: rank0_print(d, line))
    run.health, run.control_group = StepHealth(d.device, run.state.nonfinite), control_group(d)
    run.channels_last = resolved(cfg, d.device)[0]
    run.uses_teacher = distiller.uses_teacher
    run.log = MetricsLog(folder, d.rank)
    with window.paused():
        t1, t5, n_val = evaluate(lambda x: teacher_fn(x)[1], val_loader, d.device, desc="teacher eval")
    run.teacher_top1 = t1
    rank0_print(d, f"teacher {cfg.model.teacher}: val top-1 {t1:.2f}%  top-5 {t5:.2f}%  ({n_val} images)")
    run.log.write({"kind": "teacher", "step": run.state.step, "teacher_top1": t1, "teacher_top5": t5},
                  run.state.step, "teacher/")
    run.pbar = tqdm(total=total_steps, initial=run.state.step, disable=d.rank != 0, desc="train",
                    dynamic_ncols=True, file=sys.stderr)
    run.lr = engine.get_lr()[0]
    return run


def _resume(run: Run, tag: str, prior_rows: list, other_layout: Optional[dict] = None) -> None:
    """Load the checkpoint; drop metrics rows logged after it (a crash) and the row a stop logged with an
    open window (the window continues from the checkpoint), so the resumed run rewrites exactly them.
    other_layout: the checkpoint's layout, written by another number of processes."""
    if other_layout:
        from hcd.engine import reshard
        return reshard.resume(run, tag, prior_rows, other_layout)
    saved = run.saver.load(tag)
    run.state = TrainState.from_dict(saved.get("hcd", {}))
    run.window.load_state_dict(saved.get("window", {}), run.d.rank, run.d.device)
    run.train_loader.load_state_dict(saved.get("rank_state", {}).get("train_loader"))  # DALI's reader state, or None
    load_scaler_state(run.engine, saved)
    s = run.state
    rank0_print(run.d, f"resumed from {run.saver.dir / tag}: step {s.step}, epoch {s.epoch}, batch {s.batch}")
    if run.d.rank == 0:
        write_metrics(run.folder / "metrics.jsonl", [r for r in prior_rows
                                                     if r.get("step", 0) <= s.step and not r.get("partial")])
        dump_config(run.cfg, run.folder / "config.yaml")  # the config this run continues with


def train_one_epoch(run: Run, stop: StopRequest) -> Optional[str]:
    """The current epoch's remaining batches; returns why training stops (None: go on)."""
    s, loader = run.state, run.train_loader
    loader.set_epoch(s.epoch, start_batch=s.batch)
    run.engine.module.distiller.set_epoch(s.epoch)  # the method's epoch-dependent weights (DKD's warm-up)
    run.engine.train()
    reason = None
    for images, labels in loader:
        s.batch += 1
        _micro_step(run, images, labels)
        if run.micro < run.cfg.train.grad_accum:
            continue
        reason = _optimizer_step_done(run, stop)
        if reason or s.step >= run.total_steps:
            break
        every = run.cfg.train.save_every_steps
        if every and s.step % every == 0 and s.saved_step != s.step and s.batch < len(loader):
            _save(run)  # periodic, inside the epoch (an epoch's last batch is saved by its end instead)
    if s.batch >= len(loader):  # the epoch's batches are all used
        s.epoch, s.batch = s.epoch + 1, 0
        if run.micro == 0:
            _end_of_epoch(run, s.epoch)
        else:
            run.pending = s.epoch
    return reason


def _micro_step(run: Run, images, labels) -> None:
    """Forward and backward of one micro-batch, and the optimizer step at the end of a window: nothing
    here waits for the device (a non-finite loss makes the step a no-op on the device, health.py)."""
    images = input_layout(images, run.channels_last)
    f_t, z_t = run.teacher(images) if run.uses_teacher else (None, None)
    loss, _, parts = run.engine(images.to(compute_dtype(run.engine)), labels, f_t, z_t)
    run.health.observe(loss)
    run.lr = run.engine.get_lr()[0]  # the LR this optimizer step uses (host value, no sync)
    run.engine.backward(loss)
    run.micro += 1
    boundary = run.micro == run.cfg.train.grad_accum
    if boundary:
        apply_found_inf(run.engine.client_optimizer, run.health.close_window())
    run.engine.step()
    if boundary and not run.engine.was_step_applied() and run.engine.lr_scheduler is not None:
        # DeepSpeed skipped an overflowing 16-bit step (fp16-pure's loss scaler) and held the schedule back:
        # the schedule follows the optimizer steps counted here, as timm's does
        run.engine.lr_scheduler.step()
    if boundary and run.ema is not None:  # also after a skipped step: the EMA of unchanged weights (engine/ema.py)
        run.ema.update(run.engine.module.student.model, run.state.step + 1)
    run.window.add(loss, parts)


def _optimizer_step_done(run: Run, stop: StopRequest) -> Optional[str]:
    """Bookkeeping after the last micro-batch of an accumulation window: log, finish a pending epoch end,
    and say whether (and why) the run stops here."""
    s, t = run.state, run.cfg.train
    run.micro = 0
    s.step += 1
    run.pbar.update(1)
    stop_now = stop.agreed(run.control_group)
    at_stop_step = t.stop_at_step is not None and s.step >= t.stop_at_step
    if s.step % t.log_every == 0 or s.step == run.total_steps:
        _log_row(run)
    elif stop_now or at_stop_step:  # the steps since the last row, the window left open for a resume
        _log_row(run, partial=True)
    if run.pending is not None and s.step < run.total_steps:  # (the last step is evaluated by _finish)
        _end_of_epoch(run, run.pending)
    run.pending = None
    return stop.name if stop_now else "train.stop_at_step" if at_stop_step else None


def _check_health(run: Run) -> None:
    """Read the device's non-finite counters (a host sync: log rows and saves only); abort at the limit."""
    run.state.nonfinite, worst = run.health.read()
    if worst >= run.cfg.train.max_nonfinite:
        raise NonFiniteState(f"{worst} non-finite losses in a row (train.max_nonfinite={run.cfg.train.max_nonfinite}) "
                             f"by step {run.state.step}; those steps changed no weight; aborting, no checkpoint "
                             "written for this state")


def _log_row(run: Run, partial: bool = False) -> None:
    s = run.state
    means = run.window.means(reset=not partial)
    _check_health(run)
    row = {"kind": "train", "step": s.step, "epoch": round(s.epoch + s.batch / len(run.train_loader), 4),
           **means, "lr": run.lr, "nonfinite": s.nonfinite}
    if partial:
        row["partial"] = True
    run.log.write(row, s.step, "train/")
    run.pbar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{run.lr:.3g}", img_s=f"{means['images_per_s']:.0f}")


def _save(run: Run, best: bool = False) -> None:
    _check_health(run)
    distribute_bn(run.engine.module, run.cfg.train.dist_bn, run.d.world)  # what is saved (rank 0's) is every rank's
    if run.ema is not None:
        run.ema.distribute_bn(run.cfg.train.dist_bn, run.d.world)
    with run.window.paused():
        run.saver.save(run.state, best=best, window=run.window.state_dict(), ema=run.ema and run.ema.state_dict(),
                       rank_state={"train_loader": run.train_loader.state_dict()}, **scaler_state(run.engine))


def _end_of_epoch(run: Run, epoch_done: int) -> None:
    """Evaluate (every eval_every epochs and at the end) and checkpoint at an optimizer-step boundary."""
    with run.window.paused():
        if epoch_done % run.cfg.train.eval_every == 0 or run.state.step >= run.total_steps:
            _save(run, best=evaluate_student(run, epoch_done))
        else:
            _save(run)


def _finish(run: Run, reason: Optional[str]) -> int:
    """The last evaluation and checkpoint, then the export and the curves; returns the exit code."""
    s, d = run.state, run.d
    run.pbar.close()
    if reason is None and s.last_eval_step != s.step:  # the run ended inside an epoch
        _save(run, best=evaluate_student(run, round(s.epoch + s.batch / len(run.train_loader), 4)))
    elif s.saved_step != s.step:
        _save(run)
    run.log.close()
    if reason is not None:
        rank0_print(d, f"stopped by {reason} at step {s.step}; checkpoint "
                       f"{run.saver.dir / tag_for(s.step)} (continue with --resume)")
        return 0 if reason == "train.stop_at_step" else EXIT_STOPPED
    if run.cfg.train.export:
        from hcd.engine.export import export_from_engine
        export_from_engine(run.cfg, run.engine, run.folder, d.rank, run.train_loader.classes, ema=run.ema)
    if d.rank == 0:
        from hcd.engine.plot import plot_run
        plot_run(run.folder)
        rank0_print(d, f"done: {s.step} steps; best student val top-1 {s.best_top1:.2f}% "
                       f"(teacher {run.teacher_top1:.2f}%); run folder {run.folder}")
    return 0
