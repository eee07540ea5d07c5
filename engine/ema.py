"""An exponential moving average of the student's weights (train.ema_decay; timm.utils.ModelEmaV3), evaluated
beside the live weights, checkpointed with them and exported beside them (README, Configs: "EMA of the student").

What is averaged: the timm student alone (StudentModel.model), not the projectors or CFMs, which do not
exist at inference. ModelEmaV3 averages the whole state dict: parameters and buffers (BatchNorm running
statistics; num_batches_tracked is copied). The copy is made before DeepSpeed wraps the student, from the
initial fp32 weights, and kept in fp32 on the training device in every train.precision: the autocast modes
keep fp32 module weights anyway, and under *-pure the module's weights are DeepSpeed's 16-bit copies, whose
per-step change (1 - decay) x (w - ema) a 16-bit average could not hold; their EMA accumulates in fp32.

When: after every optimizer step (the accumulation boundary), also a step skipped for a non-finite loss or an
fp16 overflow: the weights did not change then, and the EMA moves towards those unchanged weights, so it stays
a pure function of the weight sequence and no step waits for the host to learn whether it was skipped. The
step number given to ModelEmaV3 is the optimizer step just done, as timm's train.py passes it: its first update
copies the weights (decay 0 at step 1), and train.ema_warmup ramps the decay up (timm's use_warmup).

Ranks: under ZeRO 0-2 every rank holds the whole student, its weights equal after every step, so every rank's
EMA parameters are equal. Its buffers follow each rank's own BatchNorm statistics; before every evaluation and
checkpoint train.dist_bn settles the EMA's statistics as the live model's (reduce: the mean of the ranks'
averages, which is the average of the ranks' mean statistics). ZeRO-3 partitions the parameters: refused in
engine/config.py (an EMA would need a gather of the whole student every step).

Checkpoint: ema.pt in the step folder (rank 0 writes it before the folder is published, engine/checkpoint.py),
loaded by every rank on resume, on any world size. A checkpoint without one, resumed with the EMA on, starts
it from the resumed weights (printed); one with an EMA, resumed with it off, leaves it out (printed).
"""
from pathlib import Path
from typing import Optional

import torch

from hcd.engine import checkpoint
from hcd.engine.batchnorm import distribute_bn


class StudentEma:
    """ModelEmaV3 of a timm student, fp32, on `device`; its best val top-1 so far travels with it."""

    def __init__(self, student: torch.nn.Module, decay: float, warmup: bool, device: torch.device):
        from timm.utils import ModelEmaV3
        # No dtype argument (timm >= 1.0.31 only): the copy is made from the fp32 initial weights; .float()
        # makes that explicit whatever the caller passes
        self.ema = ModelEmaV3(student, decay=decay, use_warmup=warmup)
        self.ema.float().to(device)
        self.ema.requires_grad_(False)
        self.best_top1 = -1.0

    @property
    def module(self) -> torch.nn.Module:
        return self.ema.module

    @torch.no_grad()
    def update(self, student: torch.nn.Module, step: int) -> None:
        """After optimizer step `step` (1-based): on device, no host sync. ModelEmaV3's decay schedule
        (get_decay) and its update (every floating state-dict entry lerped, the others copied), written here
        so that 16-bit live weights (*-pure) are read into the fp32 average: timm before 1.0.31 lerps the two
        lists as they are, which needs equal dtypes."""
        decay = self.ema.get_decay(step)
        averaged, live = [], []
        for e, v in zip(self.module.state_dict().values(), student.state_dict().values()):
            if e.is_floating_point():
                averaged.append(e)
                live.append(v.to(e.dtype))
            else:
                e.copy_(v)
        torch._foreach_lerp_(averaged, live, 1.0 - decay)

    def distribute_bn(self, mode: str, world: int) -> None:
        distribute_bn(self.module, mode, world)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "decay": self.ema.decay, "best_top1": self.best_top1}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.best_top1 = state["best_top1"]


def build_ema(cfg, student: torch.nn.Module, device: torch.device) -> Optional[StudentEma]:
    """The EMA a run keeps (None with train.ema_decay off); built before DeepSpeed wraps the student."""
    t = cfg.train
    return StudentEma(student, t.ema_decay, t.ema_warmup, device) if t.ema_decay else None


def resume_ema(ema: Optional[StudentEma], student: torch.nn.Module, ckpt_dir: Path, tag: str, say) -> None:
    """Restore the EMA of step folder `tag` (on every rank), or say what happens without one. `student`: the
    live timm student, already loaded; `say`: prints once (rank 0)."""
    saved = checkpoint.read_ema(ckpt_dir, tag)
    folder = Path(ckpt_dir) / tag
    if ema is None:
        if saved is not None:
            say(f"note: {folder} holds an EMA of the student; train.ema_decay is off, so it is not continued")
        return
    if saved is None:
        ema.ema.set(student)
        say(f"note: {folder} holds no EMA of the student (written with train.ema_decay off); the EMA starts "
            "from the resumed weights")
        return
    ema.load_state_dict(saved)
    if saved["decay"] != ema.ema.decay:
        say(f"note: the EMA was kept with decay {saved['decay']}; it continues with train.ema_decay {ema.ema.decay}")
