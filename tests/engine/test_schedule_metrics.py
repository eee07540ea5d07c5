"""Pure functions: the LR schedule and the accuracy arithmetic, on hand-made cases."""
import json
import math

import pytest
import torch

from hcd.engine.config import ScheduleConfig
from hcd.engine.errors import DataError
from hcd.engine.metrics import accuracy, read_metrics, topk_correct
from hcd.engine.schedule import lr_multiplier, make_lr_lambda, warmup_steps


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


def _kw(**over):
    kw = dict(total_steps=100, steps_per_epoch=10, name="cosine", warmup_epochs=0.5, warmup_start_factor=0.1,
              min_lr_ratio=0.0, step_epochs=3, gamma=0.1)
    kw.update(over)
    return kw


def test_warmup_is_linear_and_fractional():
    assert warmup_steps(10, 0.5) == 5
    assert lr_multiplier(0, **_kw()) == pytest.approx(0.1)
    assert lr_multiplier(1, **_kw()) == pytest.approx(0.1 + 0.9 / 5)
    assert lr_multiplier(5, **_kw()) == pytest.approx(1.0)  # first step after warmup: the cosine's top


def test_cosine_reaches_min_lr_and_step_decays():
    assert lr_multiplier(100, **_kw(min_lr_ratio=0.01)) == pytest.approx(0.01)
    mid = 5 + (100 - 5) / 2
    assert lr_multiplier(int(mid), **_kw()) == pytest.approx(0.5 * (1 + math.cos(math.pi * (int(mid) - 5) / 95)))
    step = _kw(name="step", warmup_epochs=0)
    assert [lr_multiplier(s, **step) for s in (0, 29, 30, 59, 60)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert lr_multiplier(50, **_kw(name="constant")) == 1.0


def test_lambda_from_config():
    f = make_lr_lambda(ScheduleConfig(name="cosine", warmup_epochs=1, min_lr=0.001), 0.1, 50, 10)
    assert f(0) == pytest.approx(0.01) and f(50) == pytest.approx(0.01)


def test_read_metrics_drops_a_truncated_last_line_only(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n" + '{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(p)] == [1, 2]  # a crash mid-write must not block --resume
    p.write_text('{"step": 1, "lo\n' + json.dumps({"step": 2}) + "\n")
    with pytest.raises(DataError, match=rf"^{p}: line 1 is not valid JSON"):
        read_metrics(p)  # damage in the middle is not silently skipped: one line naming file and line
    assert read_metrics(tmp_path / "missing.jsonl") == []  # a run folder whose metrics were lost


def test_fractional_steps_per_epoch_count_epochs_by_steps_taken():
    # 7 batches per epoch with accumulation 2: 3.5 optimizer steps per epoch
    step = _kw(name="step", warmup_epochs=0, steps_per_epoch=3.5, step_epochs=1)
    assert [lr_multiplier(s, **step) for s in (0, 3, 4, 6, 7)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert warmup_steps(3.5, 1.0) == 4 and warmup_steps(3.5, 2.0) == 7
