"""The LR schedule: timm's schedulers (timm.scheduler), adapted to DeepSpeed's per-step LambdaLR.

timm_scheduler() builds the scheduler OFA-KD's train.py gets from timm's create_scheduler(args, optimizer):
CosineLRScheduler (t_initial = train.epochs, lr_min = min_lr) or StepLRScheduler (decay_t = step_epochs,
decay_rate = gamma), both with warmup_t = warmup_epochs, warmup_lr_init = warmup_lr, warmup_prefix=False, one
cycle, no noise, k_decay 1; `constant` is timm's own constant: a step schedule that never decays (warm-up,
then optim.lr). update: epoch is t_in_epochs=True (OFA-KD: scheduler.step(epoch) at epoch ends, so every step
of epoch e uses timm's value at t = e); update: step is t_in_epochs=False with every length in optimizer steps
(epochs x steps per epoch, as create_scheduler with sched_on_updates), optimizer step s using timm's value at
t = s (timm's step_update(num_updates) after each update).

make_lr_lambda() turns that into the multiplier of optim.lr for optimizer step s (0-based), which DeepSpeed's
LambdaLR applies once per optimizer step: a pure function of s, so a resumed run (and engine/reshard.py's
continue_schedule) gets the same LRs. Steps per epoch may be fractional (accumulation windows that run across
epoch ends): step s belongs to epoch floor(s / steps_per_epoch), the epoch its window starts in, computed
exactly with Fractions. That is the trainer's own accounting: an epoch whose last window runs into the next
epoch ends (eval, checkpoint; timm's epoch-end step() in OFA-KD's loop) once that window's step is done.
The timm scheduler drives a stand-in optimizer (one param group), never the real one, and the lambda is a
closure, so LambdaLR's state_dict (the checkpoint) holds nothing of it."""
import math
from fractions import Fraction
from types import SimpleNamespace


def timm_scheduler(cfg_schedule, optimizer, epochs: int, steps_per_epoch=1):
    """timm's scheduler for the config on `optimizer` (anything with param_groups)."""
    from timm.scheduler import CosineLRScheduler, StepLRScheduler
    s = cfg_schedule
    per_step = s.update == "step"
    unit = float(steps_per_epoch) if per_step else 1   # timm's t: epochs, or optimizer steps
    common = dict(warmup_t=s.warmup_epochs * unit, warmup_lr_init=s.warmup_lr, warmup_prefix=False,
                  t_in_epochs=not per_step)
    if s.name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=epochs * unit, lr_min=s.min_lr, **common)
    decay_t, rate = (s.step_epochs, s.gamma) if s.name == "step" else (1, 1.0)  # constant: never decays
    return StepLRScheduler(optimizer, decay_t=decay_t * unit, decay_rate=rate, **common)


def make_lr_lambda(cfg_schedule, base_lr: float, epochs: int, steps_per_epoch):
    """A LambdaLR function: timm's LR for optimizer step `step`, divided by base_lr (optim.lr)."""
    stand_in = SimpleNamespace(param_groups=[{"lr": base_lr}])
    sched = timm_scheduler(cfg_schedule, stand_in, epochs, steps_per_epoch)
    spe = Fraction(steps_per_epoch)
    per_step = cfg_schedule.update == "step"

    def lr_lambda(step: int) -> float:
        if per_step:
            sched.step_update(step)
        else:
            sched.step(math.floor(step / spe))
        return stand_in.param_groups[0]["lr"] / base_lr
    return lr_lambda
