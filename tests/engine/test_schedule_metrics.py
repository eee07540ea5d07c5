"""Pure functions: the LR schedule and the accuracy arithmetic, on hand-made cases."""
import json
import math
from fractions import Fraction

import pytest
import torch

from hcd.engine.config import ScheduleConfig
from hcd.engine.errors import DataError
from hcd.engine.metrics import accuracy, read_metrics, topk_correct
from hcd.engine.schedule import make_lr_lambda


def test_topk_correct_hand_made():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],    # label 1: top-1 hit
                           [0.8, 0.1, 0.1, 0.0, 0.0, 0.0],    # label 2: 2nd/3rd place (tie) -> top-5 only
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],    # label 0: 6th place -> miss both
                           [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])   # label 5: top-1 hit
    target = torch.tensor([1, 2, 0, 5])
    assert topk_correct(logits, target, (1, 5)).tolist() == [2.0, 3.0]
    # counts from two "ranks" add up; percentages from the sums
    a = topk_correct(logits[:2], target[:2]) + topk_correct(logits[2:], target[2:])
    assert accuracy(a[0].item(), 4) == 50.0 and accuracy(a[1].item(), 4) == 75.0
    assert accuracy(0, 0) == 0.0


def test_topk_caps_k_at_the_number_of_classes():
    logits = torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]])
    assert topk_correct(logits, torch.tensor([0, 2]), (1, 5)).tolist() == [0.0, 2.0]


def _timm_reference(name, update, epochs, batches, accum, base_lr=0.1, warmup_epochs=3, warmup_lr=1e-4,
                    min_lr=1e-6, decay_epochs=2, gamma=0.1):
    """The LR of every optimizer step as OFA-KD's train.py gets it: timm's own factory (create_scheduler_v2, the
    args create_scheduler passes: warmup_prefix False, one cycle, no noise), driven as its loop drives it
    (step_update(num_updates) after every update, step(epoch + 1) after every epoch), with `accum` micro-batches
    per update over `batches` per epoch (windows run across epoch ends, as hcd's trainer does; the epoch end
    they cross is processed after their step, as the trainer's eval and checkpoint are)."""
    from timm.scheduler import create_scheduler_v2
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched, _ = create_scheduler_v2(opt, sched=name, num_epochs=epochs, decay_epochs=decay_epochs,
                                   decay_rate=gamma, min_lr=min_lr, warmup_lr=warmup_lr,
                                   warmup_epochs=warmup_epochs, step_on_epochs=update == "epoch",
                                   updates_per_epoch=batches / accum)
    lrs, updates, pending = [], 0, None
    for epoch in range(epochs):
        for b in range(batches):
            if (epoch * batches + b + 1) % accum == 0:
                lrs.append(opt.param_groups[0]["lr"])  # the LR this update uses
                updates += 1
                sched.step_update(updates)
                if pending is not None:  # the epoch end a window ran across, processed after its step
                    sched.step(pending)
                    pending = None
        if (epoch + 1) * batches % accum == 0:
            sched.step(epoch + 1)
        else:
            pending = epoch + 1  # hcd's trainer ends the epoch once its last window's step is done
    return lrs


@pytest.mark.parametrize("update", ["epoch", "step"])
@pytest.mark.parametrize("name", ["cosine", "step", "constant"])
@pytest.mark.parametrize("batches,accum", [(10, 1), (7, 2)])  # 10 and 3.5 optimizer steps per epoch
def test_lambda_is_timms_schedule(name, update, batches, accum):
    epochs = 7
    ref = _timm_reference(name, update, epochs, batches, accum)
    cfg = ScheduleConfig(name=name, update=update, warmup_epochs=3, warmup_lr=1e-4, min_lr=1e-6, step_epochs=2,
                         gamma=0.1)
    f = make_lr_lambda(cfg, 0.1, epochs, Fraction(batches, accum))
    ours = [0.1 * f(s) for s in range(len(ref))]
    assert len(ref) == epochs * batches // accum
    assert ours == pytest.approx(ref, rel=1e-12, abs=0)  # every step: warm-up, epoch ends, decays, the last
    assert ours[0] == pytest.approx(1e-4)  # warm-up starts at warmup_lr (absolute), in both modes
    if update == "epoch":  # the LR changes at epoch ends only
        assert len({round(v, 15) for v in ours}) <= epochs


def test_epoch_update_holds_the_lr_per_epoch_and_decays_from_the_start():
    # OFA-KD's ImageNet recipe at 4 steps per epoch: warm-up over epochs 0-2 (not 3, timm's warmup_prefix
    # False), then x0.1 at epochs 30, 60 and 90 counted from the start of training; min_lr plays no part
    cfg = ScheduleConfig(name="step", warmup_epochs=3, step_epochs=30, gamma=0.1)
    f = make_lr_lambda(cfg, 0.1, 100, 4)
    at = {e: 0.1 * f(4 * e) for e in (0, 1, 2, 3, 29, 30, 59, 60, 90, 99)}
    assert [at[e] for e in (0, 1, 2)] == pytest.approx([1e-4, 1e-4 + (0.1 - 1e-4) / 3, 1e-4 + 2 * (0.1 - 1e-4) / 3])
    assert [at[e] for e in (3, 29, 30, 59, 60, 90, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-4, 1e-4])
    assert 0.1 * f(4 * 30 - 1) == pytest.approx(0.1) and 0.1 * f(4 * 30 + 3) == pytest.approx(0.01)
    # cosine (CIFAR recipe): t = epoch out of train.epochs, no warm-up prefix; the last epoch is not yet min_lr
    cos = make_lr_lambda(ScheduleConfig(name="cosine", warmup_epochs=3, min_lr=1e-3), 0.05, 300, 2)
    for e in (3, 150, 299):
        assert 0.05 * cos(2 * e + 1) == pytest.approx(1e-3 + 0.5 * (0.05 - 1e-3) * (1 + math.cos(math.pi * e / 300)))


def test_fractional_steps_per_epoch_use_the_epoch_a_window_starts_in():
    # 7 batches per epoch with accumulation 2: step 3 takes batch 6 of epoch 0 and batch 0 of epoch 1; the
    # trainer ends epoch 0 (eval, checkpoint, the schedule's epoch) after it, so it runs at epoch 0's LR
    f = make_lr_lambda(ScheduleConfig(name="step", warmup_epochs=0, step_epochs=1), 1.0, 3, Fraction(7, 2))
    assert [f(s) for s in (0, 3, 4, 6, 7)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_read_metrics_drops_a_truncated_last_line_only(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n" + '{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(p)] == [1, 2]  # a crash mid-write must not block --resume
    p.write_text('{"step": 1, "lo\n' + json.dumps({"step": 2}) + "\n")
    with pytest.raises(DataError, match=rf"^{p}: line 1 is not valid JSON"):
        read_metrics(p)  # damage in the middle is not silently skipped: one line naming file and line
    assert read_metrics(tmp_path / "missing.jsonl") == []  # a run folder whose metrics were lost
