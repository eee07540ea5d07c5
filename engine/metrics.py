"""Metrics: the accuracy arithmetic (pure functions) and the run folder's metrics.jsonl / TensorBoard log."""
import json
from pathlib import Path
from typing import Sequence

import torch

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
