"""Resume on another number of processes (a pre-emptible cluster hands back another node count).

What changes with the world size, and how a resume handles each (README, "resume"):
  optimizer state   ZeRO-1/2 partition it per rank (*_optim_states.pt): the step folder is converted once with
                    DeepSpeed's universal checkpoint conversion (deepspeed.checkpoint.ds_to_universal) into
                    STEP/universal/ and loaded with DeepSpeed's `load_universal`; ZeRO-0 (fp32, fp16, and bf16 as
                    this engine configures it in DeepSpeed 0.19) keeps it whole in the model-states file, which
                    DeepSpeed loads on any world size as it is.
  buffers           DeepSpeed's universal load restores parameters only: BatchNorm statistics come from the
                    model-states file.
  data position     the samples of the current epoch already used are a prefix of the epoch's permutation
                    (engine/data/sampler.py deals it round-robin): batch b of W ranks has used b * B * W of them;
                    the new world resumes at the batch that prefix ends in, rounded down (a few samples are seen
                    twice), or at the next epoch when the new sharding's epoch is shorter than that prefix.
  step              counts optimizer steps of the current world size: re-expressed for the new one, so the LR
                    schedule (a function of step / steps per epoch) continues at the same epoch position.
  RNG, metrics      the per-rank RNG states belong to the old ranks: every rank is re-seeded from (seed, rank,
                    step); the metrics window open at the checkpoint (per-rank micro-batch counts) restarts.
What DeepSpeed 0.19 cannot convert (unsupported()) is refused before anything is loaded or written.
"""
import contextlib
import dataclasses
import io
import logging
import os
import random
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

WORLD = "world size (processes)"
UNIVERSAL = "universal"  # the converted copy, inside the step folder (removed with it)
ADAM_KEYS = ("exp_avg", "exp_avg_sq")  # the only optimizer state ds_to_universal 0.19 extracts and merges


def needs_conversion(step: Path) -> bool:
    """Whether DeepSpeed partitioned the optimizer state of step folder `step` per rank (its ZeRO files);
    otherwise the model-states file holds all of it."""
    return any(Path(step).glob("*_optim_states.pt"))


def unsupported(layout: dict, step: Path) -> str:
    """Why step folder `step`, written with `layout`, cannot be resumed on another world size ('' when it can)."""
    if layout.get("deepspeed.zero_stage", 0) >= 3:
        return ("hcd converts ZeRO 0-2 only (DeepSpeed 0.19's ZeRO-3 universal load knows Adam's state names only, "
                "and hcd has not verified it); resume with the world size it was written with")
    if needs_conversion(step) and layout.get("optim.name") not in ("adamw", "sgd"):
        return f"optim.name {layout.get('optim.name')} has no universal conversion"
    return ""


def universal_folder(ckpt_dir: Path, tag: str, rank: int) -> tuple:
    """STEP/universal/ (collective): rank 0 converts the step folder unless a complete conversion is there
    (the folder appears by one rename, so an interrupted conversion is redone, never half-read).
    Returns (folder, whether it was converted now)."""
    step = Path(ckpt_dir) / tag
    out = step / UNIVERSAL
    converted, failed = not out.is_dir(), [None]
    if rank == 0 and converted:
        tmp = step / f".tmp-{UNIVERSAL}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _convert(step, tmp)
            os.replace(tmp / UNIVERSAL, out)
        except Exception as e:  # noqa: BLE001 -- every rank raises it, none waits for a conversion that failed
            failed = [f"{type(e).__name__}: {e}"]
        shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.broadcast_object_list(failed, src=0)
    if failed[0]:
        raise RuntimeError(f"DeepSpeed's universal conversion of {step} failed: {failed[0]}")
    return out, converted


def _convert(step: Path, tmp: Path) -> None:
    """DeepSpeed's ds_to_universal of `step` into tmp/universal. It extracts Adam's exp_avg / exp_avg_sq only:
    SGD's momentum_buffer is handed to it under exp_avg (zeros beside it, in rewritten copies of the ZeRO
    files) and renamed back after, so the slicing and merging across ranks is DeepSpeed's own."""
    from deepspeed.checkpoint import ds_to_universal
    src, momentum = step, None
    for f in sorted(step.glob("*_optim_states.pt")):
        sd = torch.load(f, map_location="cpu", weights_only=False)  # DeepSpeed's own file
        osd = sd["optimizer_state_dict"]
        state = osd["base_optimizer_state"]["state"]
        if state and all(k in group for group in state.values() for k in ADAM_KEYS):
            break  # Adam's state (every rank's file alike): DeepSpeed converts the folder as it is
        src = tmp / "sgd-as-adam"
        src.mkdir(parents=True, exist_ok=True)
        for i, fp32 in enumerate(osd["single_partition_of_fp32_groups"]):
            buf = state.setdefault(i, {}).pop("momentum_buffer", None)
            momentum = buf is not None  # the base state is padded, the saved fp32 partition is not
            zeros = torch.zeros(fp32.numel() + osd["group_paddings"][i], dtype=fp32.dtype)
            state[i]["exp_avg"] = buf if momentum else zeros
            state[i]["exp_avg_sq"] = torch.zeros_like(state[i]["exp_avg"])
        torch.save(sd, src / f.name)
    if src != step:
        for f in step.glob("*_model_states.pt"):
            shutil.copy2(f, src / f.name)
    args = Namespace(input_folder=str(src), output_folder=str(tmp / UNIVERSAL), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)  # its progress lines are not the user's
    (tmp / "latest_universal").unlink(missing_ok=True)  # the converter's pointer, written beside its output
    if src != step:
        for f in (tmp / UNIVERSAL / "zero").glob("*/exp_avg.pt"):
            if momentum:
                os.replace(f, f.with_name("momentum_buffer.pt"))
            else:
                f.unlink()
            f.with_name("exp_avg_sq.pt").unlink()
        shutil.rmtree(src)


def load(engine, ckpt_dir: Path, tag: str, rank: int) -> tuple:
    """Restore model, optimizer and scheduler from a checkpoint of another world size; returns (client
    state, a line saying how). Buffers (BatchNorm statistics) come from the model-states file, which
    DeepSpeed's universal load leaves out; the per-rank RNG files are not read (see reseed)."""
    if not needs_conversion(Path(ckpt_dir) / tag):  # ZeRO-0: the optimizer state is whole, any world loads it
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        how = "its optimizer state is not partitioned (ZeRO-0): loaded as it is"
    else:
        folder, converted = universal_folder(ckpt_dir, tag, rank)
        config = engine._config  # DeepSpeed reads `checkpoint.load_universal` only while loading
        config.load_universal_checkpoint = True
        logger = logging.getLogger("DeepSpeed")
        level = logger.level
        logger.setLevel(logging.ERROR)  # "MPU is not provided, setting tp size to 1": right, hcd has no TP
        try:
            path, client = engine.load_checkpoint(str(folder.parent), tag=folder.name)
        finally:
            config.load_universal_checkpoint = False
            logger.setLevel(level)
        _load_buffers(engine, folder)
        how = f"DeepSpeed universal checkpoint {folder} ({'converted now' if converted else 'converted before'})"
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    return client or {}, how


def _load_buffers(engine, folder: Path) -> None:
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    saved = states["module"]
    for name, buf in engine.module.named_buffers():
        if name in saved:
            buf.data.copy_(saved[name].to(buf.dtype))


def position(epoch: int, batch: int, old_world: int, world: int, batch_size: int, batches: int,
             grad_accum: int) -> dict:
    """Where a run of `world` ranks resumes the data when a run of `old_world` ranks stopped at (epoch, batch):
    the epoch's used samples are the first batch * batch_size * old_world of its permutation (every used batch
    is full: only an epoch's last batch may be short). `batches`: the new world's batches per epoch.
    Returns epoch, batch, step (optimizer steps of the new world to this position, rounded down) and
    seen_again (samples of that prefix the new world trains on again: the position rounded down to its batch)."""
    used = batch * batch_size * old_world
    new_batch = used // (batch_size * world)
    seen_again = used - new_batch * batch_size * world
    if new_batch >= batches:  # the new sharding's (shorter) epoch is all inside what was used: the next one
        epoch, new_batch, seen_again = epoch + 1, 0, 0
    return {"epoch": epoch, "batch": new_batch, "step": (epoch * batches + new_batch) // grad_accum,
            "seen_again": seen_again}


def seed_for(seed: int, rank: int, step: int) -> int:
    """A rank's seed after a resume on another world size: a pure function of (seed, rank, step)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, rank, step]).generate_state(1)[0])


def reseed(seed: int, rank: int, step: int) -> None:
    s = seed_for(seed, rank, step)
    random.seed(s), np.random.seed(s), torch.manual_seed(s)


def continue_schedule(engine, step: int) -> None:
    """The LR scheduler and DeepSpeed's counters at optimizer step `step` of the new world."""
    sched = engine.lr_scheduler
    if sched is not None:
        sched.last_epoch = step - 1
        sched.step()  # sets every group's LR for step `step`
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()


def restep(rows: list, old_world: int, world: int) -> list:
    """metrics.jsonl rows of the old world with their steps re-expressed in the new world's (same samples per
    step and rank): one step axis for the curves and for later resumes (TensorBoard keeps the old steps)."""
    for r in rows:
        if "step" in r:
            v = r["step"] * old_world / world
            r["step"] = int(v) if v == int(v) else round(v, 4)
    return rows


def resume(run, tag: str, prior_rows: list, layout: dict) -> None:
    """The trainer's _resume (run: hcd.engine.trainer.Run) from a checkpoint of another world size: the data
    position and the step are recomputed from the samples seen, the RNG re-seeded; the metrics window and the
    rows after the checkpoint are dropped (the row a stop logged is kept), the rows' steps re-expressed in this
    world's."""
    from hcd.engine.config import dump_config
    from hcd.engine.distributed import rank0_print
    from hcd.engine.health import load_scaler_state
    from hcd.engine.metrics import write_metrics
    d, cfg, old_world = run.d, run.cfg, layout[WORLD]
    saved, how = load(run.engine, run.saver.dir, tag, d.rank)
    load_scaler_state(run.engine, saved)
    old = type(run.state).from_dict(saved.get("hcd", {}))
    at = position(old.epoch, old.batch, old_world, d.world, cfg.data.batch_size, len(run.train_loader),
                  cfg.train.grad_accum)
    run.state = dataclasses.replace(old, epoch=at["epoch"], batch=at["batch"], step=at["step"], saved_step=None,
                                    last_eval_step=at["step"] if old.last_eval_step == old.step else -1)
    continue_schedule(run.engine, at["step"])
    reseed(cfg.seed, d.rank, at["step"])
    moved = (f"{at['seen_again']} samples of epoch {old.epoch} are seen again: the position is rounded down to a "
             "batch of this world" if at["seen_again"] else "a batch boundary of both")
    rank0_print(d, f"resuming a checkpoint of {old_world} process(es) with {d.world}: {how}; data position: epoch "
                   f"{old.epoch} batch {old.batch} of {old_world} ranks is batch {at['batch']} of epoch {at['epoch']} "
                   f"of {d.world} ranks ({moved}); step {old.step} is step {at['step']} in this world's steps (the "
                   "LR schedule continues at the same epoch); every rank's RNG is re-seeded from (seed, rank, "
                   "step); the metrics window open at the checkpoint restarts")
    s = run.state
    rank0_print(d, f"resumed from {run.saver.dir / tag}: step {s.step}, epoch {s.epoch}, batch {s.batch}")
    if d.rank == 0:
        rows = [r for r in prior_rows if r.get("step", 0) <= old.step]
        write_metrics(run.folder / "metrics.jsonl", restep(rows, old_world, d.world))
        dump_config(cfg, run.folder / "config.yaml")
