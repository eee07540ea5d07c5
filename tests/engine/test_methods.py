"""Every method of docs/method.md, Baselines through the real trainer (`--set method=M`): 1 process in this
process (full run vs stopped + resumed run, bit for bit; evaluation of the export), 2 processes under ZeRO-2
through torchrun; and each module's total against its parts recomputed in float64."""
import json
import math

import pytest
import torch
import torch.nn as nn

from hcd.engine.cli import main
from hcd.engine.loss_config import LossConfig, OFAConfig
from hcd.engine.methods.logits import LogitDistiller, dkd_warmup
from hcd.engine.methods.ofa import OFADistiller
from hcd.engine.models import build_student
from hcd.kernels import dist_loss, dkd_loss, ofa_loss

BASELINES = ("ce", "kd", "dkd", "dist", "ofa")
PARTS = {"ce": {"ce"}, "kd": {"ce", "kd"}, "dkd": {"ce", "dkd"}, "dist": {"ce", "dist"},
         "ofa": {"ce", "kd", "ofa", "ofa3", "ofa4"}}  # the tiny config uses stages 3 and 4


def _rows(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _total_from_parts(method, row):
    """The logged loss from the logged parts with the tiny config's weights (all 1; DKD warmed up over 20
    epochs: (epoch + 1) / 20 in epoch 0 and 1)."""
    if method == "dkd":
        return row["ce"] + dkd_warmup(math.ceil(row["epoch"]) - 1, 20.0) * row["dkd"]
    return sum(row[k] for k in PARTS[method] if not k[-1].isdigit())


@pytest.mark.parametrize("method", BASELINES)
def test_each_method_trains_resumes_evaluates_and_exports(method, tmp_path, capsys, write_config):
    cfg = write_config(tmp_path)
    common = ["--config", cfg, "--set", f"method={method}", "--set", "train.epochs=2", "--set", "train.max_steps=8"]
    assert main(["train", *common, "--out", str(tmp_path / "full")]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "split"), "--set", "train.stop_at_step=5"]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "split"), "--resume"]) == 0
    a, b = _rows(tmp_path / "full", "train"), _rows(tmp_path / "split", "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):  # bit for bit across the stop at step 5 (inside epoch 1)
        assert set(PARTS[method]) <= set(ra) and not {"sce", "skl", "ol"} & set(ra)
        for key in ("loss", "lr", *PARTS[method]):
            assert ra[key] == rb[key] and math.isfinite(ra[key]), (ra["step"], key)
        assert ra["loss"] == pytest.approx(_total_from_parts(method, ra), rel=1e-5), ra["step"]
    last = _rows(tmp_path / "full", "eval")[-1]
    capsys.readouterr()
    for export in ("student.safetensors", "student"):  # both layouts (the folder is timm's own)
        assert main(["eval", "--config", cfg, "--set", f"method={method}",
                     "--checkpoint", str(tmp_path / "full" / export)]) == 0
        assert f"val top-1 {last['val_top1']:.2f}%  top-5 {last['val_top5']:.2f}%" in capsys.readouterr().out


@pytest.mark.parametrize("method", BASELINES)
def test_each_method_two_ranks_zero2(method, tmp_path, write_config, torchrun, train_rows):
    cfg = write_config(tmp_path)
    r = torchrun(2, ["train", "--config", cfg, "--out", str(tmp_path / "run"), "--set", f"method={method}",
                     "--set", "deepspeed.zero_stage=2", "--set", "train.max_steps=3", "--set", "train.export=false"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = train_rows(tmp_path / "run")
    assert [x["step"] for x in rows] == [1, 2, 3]
    assert all(math.isfinite(x["loss"]) and set(PARTS[method]) <= set(x) for x in rows)


def test_the_ce_method_never_runs_the_teacher_in_a_step(tmp_path, monkeypatch, write_config):
    from hcd.engine import models
    calls = []
    forward = models.FrozenTeacher.forward
    monkeypatch.setattr(models.FrozenTeacher, "forward", lambda self, x: calls.append(len(x)) or forward(self, x))
    cfg = write_config(tmp_path)
    assert main(["train", "--config", cfg, "--out", str(tmp_path / "run"), "--set", "method=ce",
                 "--set", "train.max_steps=3", "--set", "train.export=false"]) == 0
    assert sum(calls) == 20  # the teacher's own evaluation (20 val images) only


def test_resuming_with_another_method_is_a_one_line_error(tmp_path, capsys, write_config):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--config", cfg, "--out", str(run), "--set", "train.stop_at_step=1"]) == 0
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--config", cfg, "--out", str(run), "--resume", "--set", "method=kd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method is kd" in err[0] and "with hcd" in err[0]
    assert (run / "metrics.jsonl").read_text() == before


def test_dkd_warmup_follows_the_reference_epoch_count():
    assert dkd_warmup(0, 20) == pytest.approx(0.05) and dkd_warmup(9, 20) == pytest.approx(0.5)
    assert dkd_warmup(19, 20) == 1.0 and dkd_warmup(50, 20) == 1.0 and dkd_warmup(0, 0) == 1.0
    assert dkd_warmup(0, 1) == 1.0  # the ImageNet setting: full weight from the first epoch


class _Logits(nn.Module):
    """A stand-in student returning fixed logits (and no stage features)."""
    stages, stage_channels = [], []

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, images):
        return self.logits * 1, []


def _inputs(B=6, C=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, generator=g, dtype=torch.float64) * 3, torch.randn(B, C, generator=g, dtype=torch.float64) * 3,
            torch.randint(0, C, (B,), generator=g))


@pytest.mark.parametrize("method", ["ce", "kd", "dkd", "dist"])
def test_logit_methods_total_in_float64(method):
    zs, zt, y = _inputs()
    loss = LossConfig(ce_weight=0.7, kd_weight=1.3, kd_temperature=2.0, label_smoothing=0.1)
    m = LogitDistiller(_Logits(zs.clone()), method, loss, backend="eager")
    m.set_epoch(3)  # DKD: 4 / 20 of its term
    out = m(None, y, None, None if method == "ce" else zt)
    ce = torch.nn.functional.cross_entropy(zs, y, label_smoothing=0.1)
    term = {"ce": torch.zeros((), dtype=torch.float64),
            "kd": 1.3 * 4.0 * torch.nn.functional.kl_div(torch.log_softmax(zs / 2, 1), torch.log_softmax(zt / 2, 1),
                                                         reduction="batchmean", log_target=True),
            "dkd": 0.2 * dkd_loss(zs, zt, y, alpha=1.0, beta=8.0, temperature=4.0, backend="eager"),
            "dist": dist_loss(zs, zt, beta=1.0, gamma=1.0, temperature=1.0, backend="eager")}[method]
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx((0.7 * ce + term).item(), rel=1e-10)
    assert out.parts["ce"].item() == pytest.approx(ce.item(), rel=1e-10)
    out.loss.backward()  # gradients reach the student
    assert m.student.logits.grad.abs().sum() > 0


def test_ofa_total_eps_per_stage_and_init():
    torch.manual_seed(0)
    student = build_student("resnet18", 5, [2, 4])
    loss = LossConfig(ce_weight=0.5, kd_weight=2.0, ofa=OFAConfig(stage_eps=[1.5, 0.8], logits_eps=1.2, weight=0.3))
    m = OFADistiller(student, 48, 5, loss, backend="eager").double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    zt = torch.randn(4, 5, dtype=torch.float64) * 2
    y = torch.tensor([0, 3, 4, 1])
    out = m(x, y, None, zt)
    logits, feats = m.student(x)
    stage = [ofa_loss(h(p(f)), zt, y, eps=e, backend="eager")
             for p, h, f, e in zip(m.projectors, m.heads, feats, (1.5, 0.8))]
    ce = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    expect = 0.5 * ce + 2.0 * ofa_loss(logits, zt, y, eps=1.2, backend="eager") + 0.3 * (stage[0] + stage[1])
    assert out.loss.item() == pytest.approx(expect.item(), rel=1e-10)
    assert out.parts["ofa2"].item() == pytest.approx(stage[0].item(), rel=1e-10)
    # OFA-KD's init: Linear trunc-normal(0.02) with zero bias, BN 1/0, convs kaiming-normal fan_out
    for h in m.heads:
        # (truncated at +-2 absolute, as timm's trunc_normal_ that OFA-KD calls: at std 0.02 a plain normal)
        assert h.bias.abs().max() == 0 and 0.018 < h.weight.std() < 0.022 and h.weight.mean().abs() < 0.003
    bns = [b for b in m.projectors.modules() if isinstance(b, nn.BatchNorm2d)]
    assert bns and all(bool((b.weight == 1).all() and (b.bias == 0).all()) for b in bns)
    conv = next(c for c in m.projectors.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1))
    fan_out = conv.out_channels
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.15)


@pytest.mark.parametrize("method", ("hcd", *BASELINES))
def test_with_mixup_every_method_smooths_once_through_the_mixed_target(method, tiny_config):
    """Mixup/CutMix's target carries loss.label_smoothing (timm's Mixup gets it), so every train loss is built
    with eps 0; erasing alone leaves eps in the losses (docs/method.md, Soft targets)."""
    from hcd.engine.config import load_config
    from hcd.engine.distiller import build_distiller

    def eps(*sets):
        cfg = load_config(tiny_config, (f"method={method}", "loss.label_smoothing=0.1", *sets))
        loss_cfg = build_distiller(cfg, torch.device("cpu"))[1].loss_cfg
        return loss_cfg.label_smoothing, (loss_cfg.hcd() if hasattr(loss_cfg, "hcd") else loss_cfg).label_smoothing

    assert eps("data.mixup=0.8") == eps("data.cutmix=1.0") == (0.0, 0.0)
    assert eps("data.reprob=0.25") == eps() == (0.1, 0.1)
