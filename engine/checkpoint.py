"""Atomic DeepSpeed checkpoints with `latest` and `best` pointers.

Layout of RUN/checkpoints/:
  step-00000120/    one DeepSpeed checkpoint (model, optimizer, scheduler, ZeRO partitions; our client state
                    inside mp_rank_00_model_states.pt) plus rng_rank{r}.pt (python, numpy, torch RNG per rank,
                    and the rank's own "rank_state": its train loader's position, e.g. DALI's reader state)
                    and layout.json (world size, batch size, accumulation, ZeRO stage, precision: what a
                    resume must match, checked before DeepSpeed reads anything), and with train.ema_decay
                    ema.pt (the EMA of the student, the same on every rank, written by rank 0: engine/ema.py)
  latest, best      text files naming a step folder (DeepSpeed's own `latest` convention, so
                    `zero_to_fp32.py` and `engine.load_checkpoint(dir)` read them too)

Atomicity: every rank writes into `.tmp-step-N/`; after a barrier rank 0 renames the folder to `step-N/`
and then replaces the pointer files with os.replace (atomic on POSIX). A crash at any moment leaves the
previous `latest` pointing at a complete folder; stale `.tmp-*` folders are removed by the next save.
Folders referenced by neither pointer are deleted after the pointers move.
Multi-node runs need RUN on a file system every node sees (as DeepSpeed's own checkpointing does).
What a resume must match (layout.json) and the checks of a run folder before a run starts: engine/layout.py.
"""
import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from hcd.engine.distributed import barrier


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_tags(ckpt_dir: Path) -> list:
    """The complete step folders present (pointed at or not), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    return sorted(p.name for p in ckpt_dir.glob("step-*") if p.is_dir()) if ckpt_dir.is_dir() else []


def read_pointer(ckpt_dir: Path, name: str) -> Optional[str]:
    """The step folder a pointer names, or None if there is no (valid) pointer."""
    p = Path(ckpt_dir) / name
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def _write_pointer(ckpt_dir: Path, name: str, tag: str) -> None:
    tmp = Path(ckpt_dir) / f".{name}.tmp"
    with open(tmp, "w") as f:
        f.write(tag + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(ckpt_dir) / name)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


EMA_FILE = "ema.pt"


def read_ema(ckpt_dir: Path, tag: str) -> Optional[dict]:
    """The EMA state a step folder holds (StudentEma.state_dict()), or None (written with the EMA off)."""
    p = Path(ckpt_dir) / tag / EMA_FILE
    return torch.load(p, map_location="cpu", weights_only=True) if p.is_file() else None


def read_layout(ckpt_dir: Path, tag: str) -> Optional[dict]:
    """The layout a step folder was written with, or None (a checkpoint from before layouts were kept)."""
    p = Path(ckpt_dir) / tag / "layout.json"
    return json.loads(p.read_text()) if p.is_file() else None


def legacy_parameter_shapes(ckpt_dir: Path, tag: str) -> Optional[dict]:
    """{parameter name: shape} of a checkpoint whose layout.json predates the shapes, read from DeepSpeed's
    model-states file without starting DeepSpeed (its ZeRO param_shapes when present, else the module state,
    buffers included); names without EngineModule's "distiller." prefix. None when unreadable."""
    f = Path(ckpt_dir) / tag / "mp_rank_00_model_states.pt"
    try:
        states = torch.load(f, map_location="cpu", weights_only=False)  # our own file (DeepSpeed's format)
    except Exception:  # noqa: BLE001 -- missing or foreign: the caller loads as before
        return None
    shapes = {}
    for group in states.get("param_shapes") or []:  # ZeRO >= 1 (ZeRO-3's module state holds empty partitions)
        shapes.update({k: list(v) for k, v in group.items()})
    if not shapes:
        shapes = {k: list(v.shape) for k, v in (states.get("module") or {}).items() if hasattr(v, "shape")}
    prefix = "distiller."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in shapes.items()} or None


def save(engine, ckpt_dir: Path, step: int, client_state: dict, rank: int, *, latest: bool = True,
         best: bool = False, written: bool = False, layout: Optional[dict] = None,
         rank_state: Optional[dict] = None, ema: Optional[dict] = None) -> str:
    """Collective (every rank calls it): write step `step` atomically and move the pointers.

    `written`: this process already saved this very step (epoch end, then end of training): only the
    pointers move. The caller decides from its own state, the same on every rank, never from what a shared
    file system shows: a folder of the same step left by a crashed run holds other weights and is replaced.
    `ema`: the EMA's state (the same on every rank: rank 0 writes it into the folder before it is published)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    final = ckpt_dir / tag
    if not written:
        tmp_tag = f".tmp-{tag}"
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
        barrier()
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
        torch.save({**rng_state(), "rank_state": rank_state or {}}, ckpt_dir / tmp_tag / f"rng_rank{rank}.pt")
        if rank == 0 and layout is not None:
            (ckpt_dir / tmp_tag / "layout.json").write_text(json.dumps(layout, indent=1) + "\n")
        if rank == 0 and ema is not None:
            torch.save(ema, ckpt_dir / tmp_tag / EMA_FILE)
        barrier()  # every rank's files are on disk before the folder becomes visible
        if rank == 0:
            if final.exists():  # stale, from a crashed run: move it aside first, so a crash here loses nothing
                stale = ckpt_dir / f".tmp-stale-{tag}"
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(final, stale)
            os.replace(ckpt_dir / tmp_tag, final)
    if rank == 0:
        if latest:
            _write_pointer(ckpt_dir, "latest", tag)
        if best:
            _write_pointer(ckpt_dir, "best", tag)
        keep = {read_pointer(ckpt_dir, "latest"), read_pointer(ckpt_dir, "best")}
        for d in ckpt_dir.iterdir():
            if d.is_dir() and (d.name.startswith(".tmp-") or d.name.startswith("step-")) and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)
    barrier()
    return tag


def load(engine, ckpt_dir: Path, tag: str, rank: int) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; returns our client state, with this rank's
    "rank_state" ({} when none was saved)."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    rng_file = Path(ckpt_dir) / tag / f"rng_rank{rank}.pt"
    per_rank = {}
    if rng_file.is_file():  # absent only in a checkpoint without layout.json, resumed on more ranks
        # our own file, holding numpy's RNG tuple: not loadable with weights_only=True
        per_rank = torch.load(rng_file, map_location="cpu", weights_only=False)
        set_rng_state(per_rank)
    return {**(client_state or {}), "rank_state": per_rank.get("rank_state") or {}}


class NonFiniteState(RuntimeError):
    """Training reached a state that must not be checkpointed (non-finite weights or losses)."""


class Checkpointer:
    """One run's checkpoints (as timm's CheckpointSaver): save(state) writes step `state.step` unless this
    process already saved it, moves `latest` (and `best`), and refuses non-finite weights."""

    def __init__(self, engine, ckpt_dir: Path, rank: int, layout: Optional[dict] = None):
        self.engine, self.dir, self.rank, self.layout = engine, Path(ckpt_dir), rank, layout

    def save(self, state, best: bool = False, rank_state: Optional[dict] = None, ema: Optional[dict] = None,
             **extra) -> str:
        """`extra`: more client state (JSON-like values), returned by load() beside "hcd". `rank_state`: this
        rank's own state (each rank's file, not rank 0's), returned by load() as "rank_state". `ema`: the EMA's
        state (ema.pt, read back by read_ema)."""
        if not params_finite(self.engine):  # never write a non-finite checkpoint
            raise NonFiniteState(f"parameters are not finite at step {state.step}; checkpoint not written")
        tag = save(self.engine, self.dir, state.step, {"hcd": state.to_dict(), **extra}, self.rank, best=best,
                   written=state.saved_step == state.step, layout=self.layout, rank_state=rank_state, ema=ema)
        state.saved_step = state.step
        return tag

    def load(self, tag: str) -> dict:
        """Restore everything of step folder `tag`; returns the client state saved with it."""
        return load(self.engine, self.dir, tag, self.rank)


def params_finite(engine) -> bool:
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
