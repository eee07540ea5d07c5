"""TrainState: where a run is (step, epoch, batch, best accuracy, counters), saved in every checkpoint beside
DeepSpeed's own state and restored on resume."""
import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint (with DeepSpeed's own state) and restored on resume."""
    step: int = 0                     # optimizer steps done
    epoch: int = 0                    # epochs whose batches are all used
    batch: int = 0                    # batches of the current epoch used
    best_top1: float = -1.0
    nonfinite: int = 0                # non-finite losses skipped, in all
    last_eval_step: int = -1
    saved_step: Optional[int] = None  # the step this process last checkpointed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})
