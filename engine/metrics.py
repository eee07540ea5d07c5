"""Metrics: the accuracy arithmetic (pure functions), the window of training metrics kept on device between
log rows, and the run folder's metrics.jsonl / TensorBoard log."""
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from hcd.engine.errors import DataError


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the k highest logits, for each k (a float tensor on the
    logits' device, so counts from many batches and ranks can be summed without a host sync).
    k is capped at the number of classes (top-5 of a 3-class problem is top-3 = every sample)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices                  # (B, kmax), best first
    hit = top.eq(target.view(-1, 1))                        # at most one True per row
    return torch.stack([hit[:, :min(k, kmax)].any(dim=1).sum() for k in ks]).float()


def accuracy(correct: float, total: float) -> float:
    """Percentage; 0 for an empty split rather than a division error."""
    return 100.0 * correct / total if total else 0.0


class MetricWindow:
    """The loss and its parts summed on device over the micro-batches since the last train row (no host
    sync per step), and the training time they took: evaluation and checkpoint writes run `paused()`, so
    images/s counts only the steps' own time. state_dict() carries an open window through a checkpoint,
    so a resumed run logs the rows the uninterrupted run logs."""

    clock = staticmethod(time.perf_counter)

    def __init__(self, images_per_micro_batch: int):
        self.images_per_micro_batch = images_per_micro_batch  # all ranks together
        self.keys: Optional[list] = None
        self.sums: Optional[torch.Tensor] = None
        self.count, self.seconds, self._since, self._depth = 0, 0.0, self.clock(), 0

    def add(self, loss: torch.Tensor, parts: dict) -> None:
        """One micro-batch's values; a non-finite loss is left out of the means (its step was skipped)."""
        self.keys = self.keys or sorted(parts)
        vec = torch.stack([loss.detach().float()] + [parts[k].detach().float() for k in self.keys])
        good = torch.isfinite(vec[0])
        vec = torch.cat([torch.where(good, vec, torch.zeros_like(vec)), good.float()[None]])  # last: the count
        self.sums = vec if self.sums is None else self.sums + vec
        self.count += 1

    @contextmanager
    def paused(self):
        """Time inside is not training time (nested pauses count once)."""
        if self._depth == 0:
            self.seconds += self.clock() - self._since
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._since = self.clock()

    def _seconds(self) -> float:
        return self.seconds + (self.clock() - self._since if self._depth == 0 else 0.0)

    def _global_sums(self) -> torch.Tensor:
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        return sums

    def means(self, reset: bool = True) -> dict:
        """{"loss", every part, "images_per_s"} over the window, all ranks together (collective; the host
        sync of a log row). reset=False leaves the window open (a row logged at a stop)."""
        seconds = self._seconds()
        sums = self._global_sums()
        vals = (sums[:-1] / sums[-1]).tolist()  # over the finite micro-batches of every rank (none: NaN)
        row = dict(zip(["loss"] + self.keys, vals))
        row["images_per_s"] = self.count * self.images_per_micro_batch / max(seconds, 1e-9)
        if reset:
            self.sums, self.count, self.seconds, self._since = None, 0, 0.0, self.clock()
        return row

    def state_dict(self) -> dict:
        """The open window, summed over ranks (collective: called by every rank when a checkpoint is saved)."""
        if self.sums is None:
            return {}
        return {"keys": self.keys, "sums": self._global_sums().tolist(), "count": self.count,
                "seconds": self._seconds()}

    def load_state_dict(self, state: dict, rank: int, device) -> None:
        """Rank 0 takes the saved global sums, the other ranks start from zero: the next all_reduce adds up."""
        if not state:
            return
        sums = torch.tensor(state["sums"], device=device)
        self.keys, self.count, self.seconds = state["keys"], state["count"], state["seconds"]
        self.sums = sums if rank == 0 else torch.zeros_like(sums)
        self._since = self.clock()


class MetricsLog:
    """metrics.jsonl (one JSON object per line, appended and flushed) plus TensorBoard scalars.
    Only rank 0 creates one; the others pass rank != 0 and every call is a no-op."""

    def __init__(self, run: Path, rank: int):
        self.enabled = rank == 0
        self.tb = None
        if not self.enabled:
            return
        self.file = open(Path(run) / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(run) / "tb"))
        except ImportError:  # tensorboard is optional at run time: metrics.jsonl holds everything
            self.tb = None

    def write(self, row: dict, tb_step: int = None, prefix: str = ""):
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None and tb_step is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{prefix}{k}", v, tb_step)

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(path) -> list:
    """The rows of a metrics.jsonl; a truncated last line (a crash mid-write) is dropped, not fatal; a
    missing file has no rows. Any other unreadable line is a DataError naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    numbered = [(i + 1, x) for i, x in enumerate(path.read_text(encoding="utf-8").splitlines()) if x.strip()]
    rows = []
    for k, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if k == len(numbered) - 1:
                continue
            raise DataError(f"{path}: line {number} is not valid JSON (edit or remove it)") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def write_metrics(path, rows: list) -> None:
    """Replace a metrics.jsonl with `rows`, atomically: a crash mid-rewrite must not lose the run's history."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
