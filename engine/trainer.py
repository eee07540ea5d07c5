"""The HCD training loop on DeepSpeed (ZeRO 0-3), readable top to bottom.

One step (ARCHITECTURE.md): loader -> images, labels on device -> frozen teacher (outside DeepSpeed) ->
f_t, z_t -> engine(images, labels, f_t, z_t) = student + projectors + CFMs + losses -> engine.backward /
engine.step. Metrics are summed on device and reduced + fetched every `train.log_every` optimizer steps.

Host syncs we accept: ONE per micro-batch, a 2-element all-reduce (MAX) of [loss is non-finite, a stop
signal arrived] fetched with .tolist(). It lets every rank agree to skip a non-finite step before any
gradient exists (so parameters and optimizer state are untouched) and to stop at the same step on
Ctrl-C / SIGTERM. Its cost is one small collective and a wait for the forward before backward is queued.
Everything else (loss parts, images/s) is reduced only every `log_every` steps, plus evaluation once per epoch.

Runs as one process (we set up a 1-process group; no MPI discovery), under torchrun, and under the
`deepspeed` launcher (which sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*). Without CUDA, DS_ACCELERATOR=cpu
and gloo are used. DeepSpeed and the data loaders are imported inside the functions that use them.
"""
import json
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from hcd.engine import checkpoint
from hcd.engine.config import Config, ConfigError, dump_config
from hcd.engine.errors import ModelError, output_path_problem
from hcd.engine.metrics import MetricsLog, accuracy, read_metrics, topk_correct

# --------------------------------------------------------------------------------------- process group

_ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool      # we created the process group (so we destroy it at the end)
    env_set: tuple        # env keys we set for a 1-process run (removed at the end)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_deepspeed():
    """Import DeepSpeed on the right accelerator: without CUDA it must be told 'cpu' before import."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging
    # torch warns at DeepSpeed's import that CUDA_HOME has no runtime: noise on a CPU machine
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines would bury the progress bar
    return deepspeed


def process_env() -> Dist:
    """Rank, world size and device from the launcher's variables (torchrun, deepspeed), or a 1-process
    setting when none are set. Starts nothing, so bad input can be reported before DeepSpeed is imported."""
    env_set = ()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # A plain `hcd train`: a 1-process group; setting the variables keeps DeepSpeed from MPI discovery.
        env_set = tuple(k for k in _ENV_KEYS if k not in os.environ)
        defaults = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        for k in env_set:
            os.environ[k] = defaults[k]
    os.environ.setdefault("LOCAL_RANK", "0")
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Dist(rank, world, local_rank, device, False, env_set)


def init_process_group(d: Dist) -> None:
    """Through DeepSpeed (nccl on CUDA, gloo on CPU), unless a group already exists (reused)."""
    deepspeed = _import_deepspeed()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if d.device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
        d.owns_group = True


def teardown_distributed(d: Dist) -> None:
    """Nothing to undo per call: DeepSpeed caches its process groups module-wide, so a group we created
    stays up for later calls in the same process (tests, `hcd demo`) and is destroyed at exit."""
    if d.owns_group:
        import atexit
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


# ------------------------------------------------------------------------------------------- building

def build_loaders(cfg: Config, mean, std, d: Dist):
    if cfg.data.loader == "synthetic":
        from hcd.engine.data.synthetic import build_synthetic_loaders
        return build_synthetic_loaders(cfg.data, mean, std, rank=d.rank, world_size=d.world, seed=cfg.seed,
                                       device=d.device, num_classes=cfg.model.num_classes)
    from hcd.engine.data import build_loaders as build
    return build(cfg.data, mean, std, rank=d.rank, world_size=d.world, seed=cfg.seed, device=d.device)


def build_models(cfg: Config, device):
    from hcd.engine.distiller import HCDDistiller
    from hcd.engine.models import build_student, build_teacher, norm_stats
    m = cfg.model
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    student = build_student(m.student, m.num_classes, cfg.head.stages, m.student_checkpoint, m.pretrained,
                            m.student_kwargs)
    mean, std = norm_stats(student.model)
    teacher = build_teacher(m.teacher, m.num_classes, m.teacher_checkpoint, m.pretrained, m.teacher_kwargs,
                            student_mean=mean, student_std=std).to(device)
    distiller = HCDDistiller(student, teacher.feature_dim, m.num_classes, cfg.loss, cfg.head.stages,
                             cfg.head.cfm_hidden, cfg.head.backend)
    return teacher, distiller, mean, std


class EngineModule(torch.nn.Module):
    """What DeepSpeed wraps: the distiller, returning a plain tuple (loss, logits, parts) that ZeRO-3's
    hooks can see into, with the CFMs' output Linears (used by the fused loss, not called as modules)
    registered as external parameters so ZeRO-3 gathers them for forward and backward."""

    def __init__(self, distiller):
        super().__init__()
        self.distiller = distiller

    @property
    def student(self):
        return self.distiller.student

    def register_zero3_external(self):
        import deepspeed
        register_external_parameter = deepspeed.zero.register_external_parameter
        for cfm in self.distiller.cfms:
            for p in cfm.out.parameters():
                register_external_parameter(self, p)

    def forward(self, images, target, f_t, z_t):
        out = self.distiller(images, target, f_t, z_t)
        return out.loss, out.logits, out.parts


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Student + projectors + CFMs (the teacher is not in `model`). No weight decay on biases and norm
    weights (1-D tensors), as timm and the OFA-KD recipes do."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


def deepspeed_config(cfg: Config, world: int) -> dict:
    """The generated DeepSpeed config, with `deepspeed.config_file` (if any) merged underneath it."""
    t = cfg.train
    base = {}
    if cfg.deepspeed.config_file:
        p = Path(cfg.deepspeed.config_file)
        if not p.is_file():
            raise ConfigError(f"deepspeed.config_file: file not found: {p}")
        try:
            base = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed.config_file: {p} is not valid JSON ({e})") from None
        stage = base.get("zero_optimization", {}).get("stage", cfg.deepspeed.zero_stage)
        if stage != cfg.deepspeed.zero_stage:
            raise ConfigError(f"deepspeed.zero_stage: {cfg.deepspeed.zero_stage} but {p} sets stage {stage}")
    zero = dict(base.get("zero_optimization", {}), stage=cfg.deepspeed.zero_stage)
    ds = dict(base)
    ds.update({
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,   # our torch SGD/AdamW under ZeRO
        "bf16": dict(base.get("bf16", {}), enabled=t.precision == "bf16"),
        # bf16 gradients lose bits when accumulated over micro-batches and ranks: accumulate in fp32 (DeepSpeed
        # 0.19 supports that from ZeRO-1 on; ZeRO-0 with bf16 keeps bf16 gradients: prefer ZeRO-1 with bf16)
        "data_types": dict(base.get("data_types", {}), **(
            {"grad_accum_dtype": "fp32"} if t.precision == "bf16" and cfg.deepspeed.zero_stage >= 1 else {})),
        "fp16": dict(base.get("fp16", {}), enabled=t.precision == "fp16"),
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    })
    return ds


# ----------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(forward, loader, device) -> tuple:
    """(top-1 %, top-5 %) of forward(images) -> logits over the val split, all ranks together: each rank
    sums its correct counts and sample count on device, one all_reduce adds them (every sample once)."""
    counts = torch.zeros(3, device=device)
    # Val shards may differ by one batch between ranks; under ZeRO-3 every forward gathers parameters
    # collectively, so a rank that runs out early repeats a forward (uncounted) to keep the others company.
    rounds = torch.tensor([len(loader)], device=device)
    if dist.is_initialized():
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
    rounds, seen, last = int(rounds.item()), 0, None
    loader.set_epoch(0)
    for images, labels in loader:
        logits = forward(images).float()
        counts[:2] += topk_correct(logits, labels, (1, 5))
        counts[2] += labels.numel()
        seen, last = seen + 1, images
    for _ in range(rounds - seen if last is not None else 0):
        forward(last[:1])
    if dist.is_initialized():
        dist.all_reduce(counts)
    c1, c5, n = counts.tolist()
    return accuracy(c1, n), accuracy(c5, n), int(n)


def _input_dtype(engine) -> torch.dtype:
    """The dtype DeepSpeed left the student's weights in (bf16/fp16 when it converted the module)."""
    return next(engine.module.student.parameters()).dtype


def _match_buffers(engine, dtype):
    """DeepSpeed (0.19) converts parameters to bf16/fp16 but not buffers, and batch_norm in training mode then
    refuses fp32 running statistics with half weights ("Expected running_mean to have type BFloat16", seen
    on an H200; the CPU kernel refuses it too): the buffers follow the parameters' dtype."""
    if dtype != torch.float32:
        for b in engine.module.buffers():
            if b.is_floating_point():
                b.data = b.data.to(dtype)


def _student_forward(engine, dtype):
    student = engine.module.student
    return lambda images: student(images.to(dtype))[0]


# --------------------------------------------------------------------------------------------- signals

class _StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop stops at the next optimizer step with a checkpoint.
    A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class NonFiniteLoss(RuntimeError):
    pass


def _rank0_print(d: Dist, *args):
    if d.rank == 0:
        print(*args, flush=True)


def _params_finite(engine) -> bool:
    """All trainable values finite on every rank (ZeRO-3 holds a partition in ds_tensor). Called only
    before writing a checkpoint: a host sync per save."""
    ok = torch.ones((), device=next(engine.module.parameters()).device)
    for p in engine.module.parameters():
        t = getattr(p, "ds_tensor", p)
        if t.numel():
            ok = ok * torch.isfinite(t).all()
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


@contextmanager
def _distributed():
    d = process_env()
    try:
        yield d
    finally:
        teardown_distributed(d)


# ------------------------------------------------------------------------------------------ the loop

def train(cfg: Config, out=None, resume: bool = False) -> int:
    """Distil cfg.model.student from cfg.model.teacher with HCD; returns the process exit code."""
    run = Path(out or cfg.out).expanduser()
    with _distributed() as d:
        try:
            return _train(cfg, run, resume, d)
        except NonFiniteLoss as e:
            print(f"hcd train: error: {e}", file=sys.stderr, flush=True)
            return 1


def _train(cfg: Config, run: Path, resume: bool, d: Dist) -> int:
    import random

    import numpy as np
    from tqdm import tqdm

    t = cfg.train
    ckpt_dir = run / "checkpoints"

    # Everything that can fail on bad input fails here, before the run folder exists or changes.
    problem = output_path_problem(run, directory=True)
    if problem:
        raise ConfigError(f"--out: {problem}")
    resume_tag = checkpoint.read_pointer(ckpt_dir, "latest")
    steps = checkpoint.step_tags(ckpt_dir)
    if resume and resume_tag is None:
        if steps:  # the pointer was lost (a crash between a save's rename and its pointer update)
            raise ConfigError(f"--resume: {ckpt_dir}/latest names no checkpoint, but {', '.join(steps)} exist: "
                              f"write one of them into {ckpt_dir / 'latest'} (e.g. {steps[-1]}) and resume again")
        stopped = " (the run stopped before its first save: start afresh with another --out, or remove " \
                  f"{run / 'metrics.jsonl'})" if (run / "metrics.jsonl").exists() else " (nothing to resume)"
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}{stopped}")
    if not resume and (resume_tag is not None or steps):
        raise ConfigError(f"--out: {run} already holds a run with checkpoints; pass --resume to continue it or "
                          "choose another --out (a fresh run would replace them)")
    if not resume and (run / "metrics.jsonl").exists():
        raise ConfigError(f"--out: {run} already holds the metrics of a run that saved no checkpoint; choose "
                          f"another --out or remove {run / 'metrics.jsonl'}")
    teacher, distiller, mean, std = build_models(cfg, d.device)
    if cfg.model.teacher_checkpoint is None and not cfg.model.pretrained:
        _rank0_print(d, "warning: model.teacher_checkpoint is not set and model.pretrained is false: the teacher "
                        "is randomly initialised, and distilling from it teaches nothing (train.teacher_epochs "
                        "is used by `hcd demo` only)")
    train_loader, val_loader = build_loaders(cfg, mean, std, d)
    if len(train_loader.classes) != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes}, but the data has "
                          f"{len(train_loader.classes)} classes")
    if t.grad_accum > len(train_loader):
        raise ConfigError(f"train.grad_accum: {t.grad_accum} exceeds the {len(train_loader)} batches per epoch")
    # Accumulation windows run across epoch ends, so every epoch's batches are used even when grad_accum
    # does not divide them; steps per epoch is then fractional (the schedule converts epochs with it).
    steps_per_epoch = len(train_loader) / t.grad_accum
    total_steps = len(train_loader) * t.epochs // t.grad_accum
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    layout = run_layout(cfg, d.world, distiller)
    prior_rows = []
    if resume:  # before anything is written or loaded: a mismatch must leave the run as it is
        saved = with_legacy_shapes(checkpoint.read_layout(ckpt_dir, resume_tag), ckpt_dir, resume_tag,
                                   layout["parameters"])
        check_layout(saved, layout, ckpt_dir / resume_tag)
        prior_rows = read_metrics(run / "metrics.jsonl")
    ds_config = deepspeed_config(cfg, d.world)
    init_process_group(d)
    deepspeed = _import_deepspeed()

    if d.rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        if not resume:  # a resumed run's config.yaml is replaced once its checkpoint has loaded
            dump_config(cfg, run / "config.yaml")
    if dist.is_initialized():
        dist.barrier()

    from hcd.engine.schedule import make_lr_lambda
    lr_lambda = make_lr_lambda(cfg.schedule, cfg.optim.lr, total_steps, steps_per_epoch)
    module = EngineModule(distiller)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=build_optimizer(cfg, module), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda), dist_init_required=False)
    if cfg.deepspeed.zero_stage == 3:
        module.register_zero3_external()
    dtype = _input_dtype(engine)
    _match_buffers(engine, dtype)

    # Per-rank randomness (data order is derived from the seed by the loaders themselves).
    seed = cfg.seed + d.rank
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)

    state = {"step": 0, "epoch": 0, "batch": 0, "best_top1": -1.0, "nonfinite": 0, "last_eval_step": -1}
    if resume:
        state.update(checkpoint.load(engine, ckpt_dir, resume_tag, d.rank).get("hcd", {}))
        _rank0_print(d, f"resumed from {ckpt_dir / resume_tag}: step {state['step']}, epoch {state['epoch']}, "
                        f"batch {state['batch']}")
        if d.rank == 0:  # drop rows logged after the checkpoint (a crash): the resumed run rewrites them
            rows = [r for r in prior_rows if r.get("step", 0) <= state["step"]]
            tmp = run / "metrics.jsonl.tmp"  # a crash mid-rewrite must not lose the run's history
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, run / "metrics.jsonl")
            dump_config(cfg, run / "config.yaml")  # the config this run continues with
    log = MetricsLog(run, d.rank)

    t1, t5, n_val = evaluate(lambda x: teacher(x)[1], val_loader, d.device)
    _rank0_print(d, f"teacher {cfg.model.teacher}: val top-1 {t1:.2f}%  top-5 {t5:.2f}%  ({n_val} images)")
    log.write({"kind": "teacher", "step": state["step"], "teacher_top1": t1, "teacher_top5": t5}, state["step"], "teacher/")

    def client_state():
        return {"hcd": dict(state)}

    def save(best=False):
        if not _params_finite(engine):  # never write a non-finite checkpoint
            raise NonFiniteLoss(f"parameters are not finite at step {state['step']}; checkpoint not written")
        tag = checkpoint.save(engine, ckpt_dir, state["step"], client_state(), d.rank, best=best,
                              written=state.get("saved_step") == state["step"], layout=layout)
        state["saved_step"] = state["step"]
        return tag

    def run_eval(epoch_done: int):
        engine.eval()
        top1, top5, n_val_seen = evaluate(_student_forward(engine, dtype), val_loader, d.device)
        engine.train()
        state["last_eval_step"] = state["step"]
        best = top1 > state["best_top1"]
        if best:
            state["best_top1"] = top1
        log.write({"kind": "eval", "epoch": epoch_done, "step": state["step"], "val_top1": top1, "val_top5": top5,
                   "val_samples": n_val_seen,
                   "best_top1": state["best_top1"]}, state["step"], "val/")
        return top1, top5, best

    pbar = tqdm(total=total_steps, initial=state["step"], disable=d.rank != 0, desc="train", dynamic_ncols=True,
                file=sys.stderr)
    sums, keys, n_micro = None, None, 0            # device-side running sums since the last log
    micro = 0                                       # good micro-batches in the current accumulation window
    in_row = 0                                      # consecutive non-finite losses
    pending = None                                  # an epoch ended mid-window: save/eval at the next boundary
    lr = engine.get_lr()[0]
    t_log = time.perf_counter()
    stop_reason = None
    flags = torch.zeros(2, device=d.device)

    with _StopRequest() as stop:
        while state["step"] < total_steps and stop_reason is None:
            train_loader.set_epoch(state["epoch"], start_batch=state["batch"])
            engine.train()
            for images, labels in train_loader:
                state["batch"] += 1
                f_t, z_t = teacher(images)
                loss_t, _, parts = engine(images.to(dtype), labels, f_t, z_t)
                loss = loss_t.float()
                # The one accepted host sync per micro-batch: [non-finite loss anywhere, stop requested].
                flags[0] = (~torch.isfinite(loss)).float()
                flags[1] = 1.0 if stop.signum is not None else 0.0
                if d.world > 1:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                bad, stop_now = flags.tolist()
                if bad:
                    state["nonfinite"] += 1
                    in_row += 1
                    _rank0_print(d, f"step {state['step'] + 1}: non-finite loss, step skipped "
                                    f"({in_row} in a row, {state['nonfinite']} in all)")
                    if in_row >= t.max_nonfinite:
                        raise NonFiniteLoss(f"{in_row} non-finite losses in a row (train.max_nonfinite="
                                            f"{t.max_nonfinite}) at step {state['step'] + 1}; aborting, "
                                            "no checkpoint written for this state")
                    continue
                in_row = 0
                lr = engine.get_lr()[0]  # the LR this optimizer step uses (host value, no sync)
                engine.backward(loss_t)
                engine.step()
                vec = torch.stack([loss.detach()] + [parts[k].float() for k in (keys or sorted(parts))])
                keys = keys or sorted(parts)
                sums = vec if sums is None else sums + vec
                n_micro += 1
                micro += 1
                if micro < t.grad_accum:
                    continue
                micro = 0
                state["step"] += 1
                pbar.update(1)

                stopping = stop_now or (t.stop_at_step is not None and state["step"] >= t.stop_at_step)
                # a stop logs the steps since the last row too (every rank agrees on it: flags are all-reduced)
                if state["step"] % t.log_every == 0 or state["step"] == total_steps or stopping:
                    if d.world > 1:
                        dist.all_reduce(sums)
                    vals = (sums / (n_micro * d.world)).tolist()  # the metrics host sync
                    now = time.perf_counter()
                    ips = n_micro * cfg.data.batch_size * d.world / max(now - t_log, 1e-9)
                    row = {"kind": "train", "step": state["step"],
                           "epoch": round(state["epoch"] + state["batch"] / len(train_loader), 4),
                           "loss": vals[0], **dict(zip(keys, vals[1:])), "lr": lr, "images_per_s": ips,
                           "nonfinite": state["nonfinite"]}
                    log.write(row, state["step"], "train/")
                    pbar.set_postfix(loss=f"{vals[0]:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}")
                    sums, n_micro, t_log = None, 0, time.perf_counter()

                if pending is not None and state["step"] >= total_steps:
                    pending = None  # the run's last step: evaluated below, labelled with the epochs it used
                if pending is not None:  # the epoch ended inside an accumulation window
                    _end_of_epoch(pending, state, t, total_steps, run_eval, save, d, pbar)
                    pending, t_log = None, time.perf_counter()
                if stop_now:
                    stop_reason = signal.Signals(int(stop.signum or signal.SIGTERM)).name
                elif t.stop_at_step is not None and state["step"] >= t.stop_at_step:
                    stop_reason = "train.stop_at_step"
                if stop_reason or state["step"] >= total_steps:
                    break
                if (t.save_every_steps and state["step"] % t.save_every_steps == 0
                        and state.get("saved_step") != state["step"] and state["batch"] < len(train_loader)):
                    save()  # periodic, inside the epoch (an epoch's last batch is saved by its end instead)
                    t_log = time.perf_counter()
            if state["batch"] >= len(train_loader):  # the epoch's batches are all used
                state["epoch"] += 1
                state["batch"] = 0
                if micro == 0:
                    _end_of_epoch(state["epoch"], state, t, total_steps, run_eval, save, d, pbar)
                    t_log = time.perf_counter()
                else:
                    pending = state["epoch"]
        pbar.close()

        if stop_reason is None and state["last_eval_step"] != state["step"]:  # ended inside an epoch
            epoch = round(state["epoch"] + state["batch"] / len(train_loader), 4)
            top1, top5, best = run_eval(epoch)
            _rank0_print(d, f"epoch {epoch:g}: student val top-1 {top1:.2f}%  top-5 {top5:.2f}%")
            save(best=best)
        elif state.get("saved_step") != state["step"]:
            save()

    log.close()
    if stop_reason is not None:
        _rank0_print(d, f"stopped by {stop_reason} at step {state['step']}; checkpoint "
                        f"{ckpt_dir / checkpoint.tag_for(state['step'])} (continue with --resume)")
        return 0 if stop_reason == "train.stop_at_step" else 1

    if t.export:
        _export(cfg, engine, run, d, train_loader.classes)
    if d.rank == 0:
        from hcd.engine.plot import plot_run
        plot_run(run)
        _rank0_print(d, f"done: {state['step']} steps; best student val top-1 {state['best_top1']:.2f}% "
                        f"(teacher {t1:.2f}%); run folder {run}")
    return 0


def run_layout(cfg: Config, world: int, model: Optional[torch.nn.Module] = None) -> dict:
    """What a resume must match: the data order and position (world size, per-rank batch, accumulation
    give the shards and the step count per epoch), DeepSpeed's per-rank optimizer state (ZeRO stage,
    precision, optimizer) and, with `model`, the shape of every parameter (model.*, head.* and
    loss.n_sublogits decide them)."""
    layout = {"world size (processes)": world, "data.batch_size": cfg.data.batch_size,
              "train.grad_accum": cfg.train.grad_accum, "deepspeed.zero_stage": cfg.deepspeed.zero_stage,
              "train.precision": cfg.train.precision, "optim.name": cfg.optim.name}
    if model is not None:
        layout["parameters"] = parameter_shapes(model)
    return layout


def parameter_shapes(model: torch.nn.Module) -> dict:
    return {name: list(p.shape) for name, p in model.named_parameters()}


def check_layout(saved: Optional[dict], now: dict, folder: Path, flag: str = "--resume",
                 why: str = "a run resumes only with the same world size, data.batch_size, train.grad_accum, "
                            "deepspeed.zero_stage, train.precision and optim.name", hint: str = "") -> None:
    """One-line ConfigError naming the first field of `now` that differs from the checkpoint's, or the
    first parameters whose shapes differ (none: a checkpoint written before layouts were kept, or before
    they held the parameters, is loaded as before)."""
    if saved is None:
        return
    for key, value in now.items():
        if key != "parameters" and key in saved and saved[key] != value:
            raise ConfigError(f"{flag}: {key} is {value} but {folder} was written with {saved[key]}; {why}")
    if "parameters" in now and "parameters" in saved:
        diff = parameter_differences(saved["parameters"], now["parameters"])
        if diff:
            more = f" (+{len(diff) - 2} more)" if len(diff) > 2 else ""
            raise ConfigError(f"{flag}: this config builds another model than {folder} holds: {'; '.join(diff[:2])}"
                              f"{more}; model.*, head.* and loss.n_sublogits must be the run's{hint}")


def with_legacy_shapes(saved: Optional[dict], ckpt_dir: Path, tag: str, params: dict) -> Optional[dict]:
    """A checkpoint's layout (read_layout), with parameter shapes even when it was written before they were
    kept: then recovered from DeepSpeed's model-states file, buffers included, so this model's names only."""
    if saved is None or "parameters" in saved:
        return saved
    legacy = checkpoint.legacy_parameter_shapes(ckpt_dir, tag)
    return dict(saved, parameters={k: v for k, v in legacy.items() if k in params}) if legacy else saved


def parameter_differences(saved: dict, now: dict) -> list:
    """Readable differences between two {parameter name: shape} maps, in the model's order."""
    diff = [f"{k} is {tuple(v)} here, {tuple(saved[k])} in the checkpoint" for k, v in now.items()
            if k in saved and list(saved[k]) != list(v)]
    diff += [f"{k} is not in the checkpoint" for k in now if k not in saved]
    diff += [f"the checkpoint's {k} is not in this model" for k in saved if k not in now]
    return diff


def _end_of_epoch(epoch_done, state, t, total_steps, run_eval, save, d, pbar):
    """Evaluate (every eval_every epochs and at the end) and checkpoint at an optimizer-step boundary."""
    if epoch_done % t.eval_every == 0 or state["step"] >= total_steps:
        top1, top5, best = run_eval(epoch_done)
        pbar.write(f"epoch {epoch_done}: student val top-1 {top1:.2f}%  top-5 {top5:.2f}%") if d.rank == 0 else None
        save(best=best)
    else:
        save()


def _student_state_dict(engine, zero_stage: int, rank: int) -> dict:
    """The timm student's full state dict on rank 0 ({} on the others); collective (every rank calls it).

    Parameters are the fp32 master weights wherever DeepSpeed keeps them (16-bit training under ZeRO or
    its bf16 optimizer), not the 16-bit copies the model computes with: a bf16 copy keeps 8 bits of
    mantissa. Buffers (BatchNorm statistics) are the module's own. ZeRO-3 gathers its partitions."""
    from deepspeed.utils import safe_get_full_fp32_param
    student = engine.module.student.model
    masters = {name: safe_get_full_fp32_param(p) for name, p in student.named_parameters()}  # collective
    if zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None):
            sd = {k: v.detach().clone() for k, v in student.state_dict().items()} if rank == 0 else {}
    else:
        sd = dict(student.state_dict()) if rank == 0 else {}
    if rank != 0:
        return {}
    for name, master in masters.items():
        if master is not None and name in sd:
            sd[name] = master.detach().float()
    return sd


def _export(cfg: Config, engine, run: Path, d: Dist, classes, stem="student"):
    from hcd.engine.export import export_student
    from hcd.engine.models import norm_stats
    sd = _student_state_dict(engine, cfg.deepspeed.zero_stage, d.rank)
    if d.rank == 0:
        mean, std = norm_stats(engine.module.student.model)
        path = export_student(sd, run, cfg.model.student, cfg.model.num_classes, model_kwargs=cfg.model.student_kwargs,
                              mean=mean, std=std, img_size=cfg.data.img_size, crop_pct=cfg.data.crop_pct,
                              class_names=classes, stem=stem)
        print(f"exported the student: {path} (+ {path.with_suffix('.json').name})", flush=True)


# ----------------------------------------------------------------------------------------- hcd eval

def evaluate_checkpoint(cfg: Config, checkpoint_path: str) -> int:
    """Student (and teacher) accuracy on the val split from a checkpoint folder (a run's checkpoints/,
    or one step folder in it) or from an exported student .safetensors. A checkpoint folder's student is
    also exported next to it (student.safetensors + .json in the step folder)."""
    p = Path(checkpoint_path)
    if not p.exists():
        raise ConfigError(f"--checkpoint: {p} not found")
    with _distributed() as d:
        if p.suffix == ".safetensors":
            return _eval_export(cfg, p, d)
        if (p / "latest").is_file():
            ckpt_dir, tag = p, checkpoint.read_pointer(p, "latest")
        elif p.is_dir() and p.name.startswith("step-"):
            ckpt_dir, tag = p.parent, p.name
        else:
            raise ConfigError(f"--checkpoint: {p} is neither a checkpoints folder, a step-* folder nor a .safetensors file")
        if tag is None:
            raise ConfigError(f"--checkpoint: {p}/latest names no existing checkpoint")
        # With the layout it was written with, the optimizer state loads too: the export then holds the fp32
        # master weights, and ZeRO-3 (whose weights live in the optimizer partitions) loads at all.
        # Otherwise the module's weights alone (ZeRO <= 2), on any number of processes.
        saved, now = checkpoint.read_layout(ckpt_dir, tag), run_layout(cfg, d.world)
        keys = ("world size (processes)", "deepspeed.zero_stage", "train.precision", "optim.name")
        full = saved is not None and all(saved.get(k) == now[k] for k in keys)
        if not full and 3 in (cfg.deepspeed.zero_stage, (saved or {}).get("deepspeed.zero_stage")):
            check_layout(saved, {k: now[k] for k in keys}, ckpt_dir / tag, "--checkpoint",
                         "a ZeRO-3 checkpoint loads only with the run's config and world size (or evaluate "
                         "the run's exported student.safetensors)")
            full = True  # a checkpoint from before layout.json: try
        teacher, distiller, mean, std = build_models(cfg, d.device)
        shapes = parameter_shapes(distiller)
        check_layout(with_legacy_shapes(saved, ckpt_dir, tag, shapes), {"parameters": shapes}, ckpt_dir / tag,
                     "--checkpoint", hint="; the run's exported student.safetensors evaluates under any head settings")
        _, val_loader = build_loaders(cfg, mean, std, d)
        ds_config = deepspeed_config(cfg, d.world)
        init_process_group(d)
        deepspeed = _import_deepspeed()
        module = EngineModule(distiller)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=build_optimizer(cfg, module),
                                               config=ds_config, dist_init_required=False)
        if cfg.deepspeed.zero_stage == 3:
            module.register_zero3_external()
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=not full,
                                         load_optimizer_states=full, load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"--checkpoint: DeepSpeed found no checkpoint at {ckpt_dir / tag}")
        dtype = _input_dtype(engine)
        _match_buffers(engine, dtype)
        engine.eval()
        s1, s5, n = evaluate(_student_forward(engine, dtype), val_loader, d.device)
        t1, t5, _ = evaluate(lambda x: teacher(x)[1], val_loader, d.device)
        _rank0_print(d, f"student {cfg.model.student} ({ckpt_dir / tag}): val top-1 {s1:.2f}%  top-5 {s5:.2f}%  "
                        f"({n} images); teacher top-1 {t1:.2f}%  top-5 {t5:.2f}%")
        _export(cfg, engine, ckpt_dir / tag, d, val_loader.classes)
    return 0


def _eval_export(cfg: Config, weights: Path, d: Dist) -> int:
    from hcd.engine.export import load_exported
    from hcd.engine.models import norm_stats
    if not weights.is_file() or not weights.with_suffix(".json").is_file():
        raise ModelError(f"--checkpoint: {weights} or its {weights.with_suffix('.json').name} is missing")
    model = load_exported(weights).to(d.device).eval()
    mean, std = norm_stats(model)
    _, val_loader = build_loaders(cfg, mean, std, d)
    if d.world > 1:
        init_process_group(d)  # the val split is sharded over the ranks: counts are summed
    s1, s5, n = evaluate(model, val_loader, d.device)
    _rank0_print(d, f"student {weights}: val top-1 {s1:.2f}%  top-5 {s5:.2f}%  ({n} images)")
    return 0
