"""Accuracy on the val split: evaluate() (all ranks together), the trainer's evaluation of its student (and of
the student's EMA, engine/ema.py), and `hcd eval` of a checkpoint (or of its EMA) or of an export."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hcd.engine import checkpoint
from hcd.engine.batchnorm import distribute_bn
from hcd.engine.config import Config, ConfigError
from hcd.engine.distributed import (Dist, autocast_precision, build_engine, compute_dtype, distributed,
                                    init_process_group, rank0_print)
from hcd.engine.errors import ModelError
from hcd.engine.layout import check_layout, legacy_precision, parameter_shapes, run_layout, with_legacy_shapes
from hcd.engine.metrics import accuracy, topk_correct
from hcd.engine.speed import autocast


@torch.no_grad()
def evaluate(forward, loader, device, desc: str = "eval") -> tuple:
    """(top-1 %, top-5 %, samples) of forward(images) -> logits over the val split, all ranks together: each
    rank sums its correct counts and sample count on device, one all_reduce adds them (every sample once).
    Rank 0 shows a progress bar named `desc` (gone when done)."""
    from tqdm import tqdm
    counts = torch.zeros(3, device=device)
    # Val shards may differ by one batch between ranks; under ZeRO-3 every forward gathers parameters
    # collectively, so a rank that runs out early repeats a forward (uncounted) to keep the others company.
    rounds = torch.tensor([len(loader)], device=device)
    if dist.is_initialized():
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
    rounds, seen, last = int(rounds.item()), 0, None
    loader.set_epoch(0)
    quiet = dist.is_initialized() and dist.get_rank() != 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=quiet, file=sys.stderr, dynamic_ncols=True):
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


def student_forward(engine):
    """images -> student logits as the engine's forward computes them: in the dtype DeepSpeed keeps the
    student's weights in, under the engine's autocast (train.precision bf16 / fp16)."""
    student, dtype, precision = engine.module.student, compute_dtype(engine), autocast_precision(engine)

    def forward(images):
        with autocast(precision, images.device.type):
            return student(images.to(dtype))[0]
    return forward


def fp32_forward(model, precision: str):
    """images -> logits of a model whose weights are fp32 (an EMA, an export), under the run's autocast
    (train.precision; none for fp32 and the -pure modes, whose 16-bit images are read as fp32)."""
    def forward(images):
        with autocast(precision, images.device.type):
            return model(images.float())
    return forward


def evaluate_student(run, epoch) -> bool:
    """Val accuracy of a run's student (run: hcd.engine.trainer.Run), and of its EMA when the run keeps one,
    logged in one eval row; returns whether the student is the best so far."""
    s = run.state
    distribute_bn(run.engine.module, run.cfg.train.dist_bn, run.d.world)  # every rank evaluates the same model
    run.engine.eval()
    top1, top5, n_val = evaluate(student_forward(run.engine), run.val_loader, run.d.device)
    run.engine.train()
    s.last_eval_step = s.step
    best = top1 > s.best_top1
    s.best_top1 = max(s.best_top1, top1)
    row = {"kind": "eval", "epoch": epoch, "step": s.step, "val_top1": top1, "val_top5": top5,
           "val_samples": n_val, "best_top1": s.best_top1}
    ema = run.ema
    if ema is not None:  # its BatchNorm statistics settled over the ranks first, as the student's
        ema.distribute_bn(run.cfg.train.dist_bn, run.d.world)
        e1, e5, _ = evaluate(fp32_forward(ema.module, autocast_precision(run.engine)), run.val_loader, run.d.device,
                             desc="ema eval")
        ema.best_top1 = max(ema.best_top1, e1)
        row.update(val_top1_ema=e1, val_top5_ema=e5, best_top1_ema=ema.best_top1)
    run.log.write(row, s.step, "val/")
    if run.d.rank == 0:
        run.pbar.write(f"epoch {epoch:g}: student val top-1 {top1:.2f}%  top-5 {top5:.2f}%")
        if ema is not None:
            run.pbar.write(f"epoch {epoch:g}: student EMA val top-1 {row['val_top1_ema']:.2f}%  "
                           f"top-5 {row['val_top5_ema']:.2f}%")
    return best


def evaluate_checkpoint(cfg: Config, checkpoint_path: str, ema: bool = False) -> int:
    """Student (and teacher) accuracy on the val split from a checkpoint folder (a run's checkpoints/,
    or one step folder in it) or from an exported student (its timm folder or its .safetensors). A checkpoint folder's student is
    also exported next to it (student.safetensors + .json in the step folder). `ema`: the checkpoint's EMA of
    the student instead (exported as student_ema)."""
    p = Path(checkpoint_path)
    if not p.exists():
        raise ConfigError(f"--checkpoint: {p} not found")
    with distributed() as d:
        if p.suffix == ".safetensors" or (p / "config.json").is_file():
            if ema:
                raise ConfigError(f"--ema: {p} is an exported student; --ema evaluates the EMA a checkpoint holds "
                                  "(an exported student_ema evaluates without --ema)")
            return _evaluate_export(cfg, p, d)
        if (p / "latest").is_file():
            ckpt_dir, tag = p, checkpoint.read_pointer(p, "latest")
        elif p.is_dir() and p.name.startswith("step-"):
            ckpt_dir, tag = p.parent, p.name
        else:
            raise ConfigError(f"--checkpoint: {p} is neither a checkpoints folder, a step-* folder, an exported "
                              "student folder (config.json) nor a .safetensors file")
        if tag is None:
            raise ConfigError(f"--checkpoint: {p}/latest names no existing checkpoint")
        if ema:
            return _evaluate_ema(cfg, ckpt_dir, tag, d)
        return _evaluate_step_folder(cfg, ckpt_dir, tag, d)


def _load_optimizer_too(cfg: Config, saved, d: Dist, folder: Path) -> bool:
    """With the layout it was written with, the optimizer state loads too: the export then holds the fp32
    master weights, and ZeRO-3 (whose weights live in the optimizer partitions) loads at all. Otherwise the
    module's weights alone (ZeRO <= 2), on any number of processes."""
    keys = ("world size (processes)", "deepspeed.zero_stage", "train.precision", "optim.name")
    now = run_layout(cfg, d.world)
    if saved is not None and all(saved.get(k) == now[k] for k in keys):
        return True
    if 3 in (cfg.deepspeed.zero_stage, (saved or {}).get("deepspeed.zero_stage")):
        check_layout(saved, {k: now[k] for k in keys}, folder, "--checkpoint",
                     "a ZeRO-3 checkpoint loads only with the run's config and world size (or evaluate "
                     "the run's exported student.safetensors)")
        return True  # a checkpoint from before layout.json: try
    return False


def _evaluate_step_folder(cfg: Config, ckpt_dir: Path, tag: str, d: Dist) -> int:
    from hcd.engine.data import build_run_loaders
    from hcd.engine.distiller import build_distiller
    from hcd.engine.export import export_from_engine
    saved = legacy_precision(checkpoint.read_layout(ckpt_dir, tag))
    full = _load_optimizer_too(cfg, saved, d, ckpt_dir / tag)
    teacher, distiller, mean, std = build_distiller(cfg, d.device, d.rank)
    shapes = parameter_shapes(distiller)
    check_layout(with_legacy_shapes(saved, ckpt_dir, tag, shapes), {"method": cfg.method, "parameters": shapes},
                 ckpt_dir / tag, "--checkpoint", why="evaluate a checkpoint with its run's config (RUN/config.yaml)",
                 hint="; the run's exported student.safetensors evaluates under any head settings")
    _, val_loader = build_run_loaders(cfg, mean, std, d)
    engine = build_engine(cfg, distiller, d)
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=not full,
                                     load_optimizer_states=full, load_lr_scheduler_states=False)
    if path is None:
        raise ConfigError(f"--checkpoint: DeepSpeed found no checkpoint at {ckpt_dir / tag}")
    engine.eval()
    s1, s5, n = evaluate(student_forward(engine), val_loader, d.device)
    t1, t5, _ = evaluate(lambda x: teacher(x)[1], val_loader, d.device, desc="teacher eval")
    rank0_print(d, f"student {cfg.model.student} ({ckpt_dir / tag}): val top-1 {s1:.2f}%  top-5 {s5:.2f}%  "
                   f"({n} images); teacher top-1 {t1:.2f}%  top-5 {t5:.2f}%")
    export_from_engine(cfg, engine, ckpt_dir / tag, d.rank, val_loader.classes)
    return 0


def _evaluate_export(cfg: Config, weights: Path, d: Dist) -> int:
    from hcd.engine.export import load_exported
    meta = weights / "config.json" if weights.is_dir() else weights.with_suffix(".json")
    if not meta.is_file() or not (weights.is_dir() or weights.is_file()):
        raise ModelError(f"--checkpoint: {weights} or its {meta.name} is missing")
    arch = json.loads(meta.read_text()).get("architecture")
    if arch != cfg.model.student:
        rank0_print(d, f"note: {weights.name} holds a {arch} (its .json says how to build it); the config's "
                       f"model.student ({cfg.model.student}) is not used")
    s1, s5, n, _ = _evaluate_model(cfg, load_exported(weights), d)
    rank0_print(d, f"student {weights}: val top-1 {s1:.2f}%  top-5 {s5:.2f}%  ({n} images)")
    return 0


def _evaluate_model(cfg: Config, model, d: Dist, desc: str = "eval") -> tuple:
    """(top-1, top-5, samples, val loader) of a model with fp32 weights (an export, an EMA) on the config's val
    split, all ranks together, evaluated as the run evaluated it (fp32_forward)."""
    from hcd.engine.data import build_run_loaders
    from hcd.engine.models import norm_stats
    model = model.to(d.device).eval()
    _, val_loader = build_run_loaders(cfg, *norm_stats(model), d)
    if d.world > 1:
        init_process_group(d)  # the val split is sharded over the ranks: counts are summed
    return (*evaluate(fp32_forward(model, cfg.train.precision), val_loader, d.device, desc=desc), val_loader)


def _evaluate_ema(cfg: Config, ckpt_dir: Path, tag: str, d: Dist) -> int:
    """The EMA of the student a step folder holds (ema.pt): built as the config's student (no DeepSpeed: the
    EMA is whole in every checkpoint), evaluated as the trainer evaluated it (fp32 weights under the run's
    autocast), and exported into the step folder as student_ema."""
    from hcd.engine.export import export_state_dict
    from hcd.engine.models import build_student, norm_stats
    saved = checkpoint.read_ema(ckpt_dir, tag)
    if saved is None:
        raise ConfigError(f"--ema: {ckpt_dir / tag} holds no EMA of the student (its run had train.ema_decay off)")
    m = cfg.model
    model = build_student(m.student, m.num_classes, [], None, False, m.student_kwargs).model
    try:
        model.load_state_dict(saved["module"])
    except RuntimeError as e:
        raise ConfigError(f"--ema: the EMA in {ckpt_dir / tag} is not a {m.student} of this config "
                          f"({str(e).splitlines()[0]}); evaluate it with its run's config") from None
    s1, s5, n, val_loader = _evaluate_model(cfg, model, d, desc="ema eval")
    rank0_print(d, f"student EMA {m.student} ({ckpt_dir / tag}): val top-1 {s1:.2f}%  top-5 {s5:.2f}%  ({n} images)")
    if d.rank == 0:
        export_state_dict(cfg, saved["module"], norm_stats(model), ckpt_dir / tag, val_loader.classes, "student_ema",
                          "the student's EMA")
    return 0
