"""Learning-rate schedule as a pure function of the optimizer step: linear warmup, then cosine, step or
constant. Per-step (not per-epoch), so warmup may last a fractional number of epochs."""
import math


def warmup_steps(steps_per_epoch: float, warmup_epochs: float) -> int:
    return int(round(warmup_epochs * steps_per_epoch))


def lr_multiplier(step: int, *, total_steps: int, steps_per_epoch: float, name: str, warmup_epochs: float,
                  warmup_start_factor: float, min_lr_ratio: float, step_epochs: int, gamma: float) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based).

    warmup: linear from warmup_start_factor to 1 over round(warmup_epochs * steps_per_epoch) steps;
    cosine: from 1 down to min_lr_ratio at total_steps; step: gamma ** (epochs done // step_epochs),
    counted from the start of training (as the recipes do); constant: 1. steps_per_epoch may be fractional
    (accumulation windows that run across epoch ends)."""
    w = warmup_steps(steps_per_epoch, warmup_epochs)
    if step < w:
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / w
    if name == "cosine":
        progress = min(1.0, (step - w) / max(1, total_steps - w))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "step":
        return gamma ** (int(step // max(1, steps_per_epoch)) // step_epochs)
    return 1.0


def make_lr_lambda(cfg_schedule, base_lr: float, total_steps: int, steps_per_epoch: float):
    """A LambdaLR function for the config's schedule (the scheduler steps once per optimizer step)."""
    kw = dict(total_steps=total_steps, steps_per_epoch=steps_per_epoch, name=cfg_schedule.name,
              warmup_epochs=cfg_schedule.warmup_epochs, warmup_start_factor=cfg_schedule.warmup_start_factor,
              min_lr_ratio=min(1.0, cfg_schedule.min_lr / base_lr), step_epochs=cfg_schedule.step_epochs,
              gamma=cfg_schedule.gamma)
    return lambda step: lr_multiplier(step, **kw)
