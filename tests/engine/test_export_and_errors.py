"""Student export (timm round trip) and malformed configs (one-line errors, exit 2, no run folder)."""
import json
import os
from pathlib import Path

import pytest
import timm
import torch

from hcd.engine.cli import main
from hcd.engine.export import export_student, load_exported
from hcd.engine.models import build_student, norm_stats


def test_export_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    student = build_student("resnet18", 7, [3, 4], kwargs={"drop_rate": 0.0})
    with torch.no_grad():  # non-default BN statistics, so a missed buffer would show
        for m in student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    mean, std = norm_stats(student.model)
    path = export_student(student.model.state_dict(), tmp_path, "resnet18", 7, model_kwargs={"drop_rate": 0.0},
                          mean=mean, std=std, img_size=32, class_names=list("abcdefg"))
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["architecture"] == "resnet18" and meta["pretrained_cfg"]["input_size"] == [3, 32, 32]
    x = torch.randn(3, 3, 32, 32)
    expect = student.model.eval()(x)
    # the documented timm call: the overlay must carry num_classes too, otherwise timm compares K with the
    # default cfg's 1000 classes and drops (re-initialises) the classifier
    m = timm.create_model("resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=7),
                          num_classes=7)
    assert torch.equal(m.eval()(x), expect)
    dropped = timm.create_model("resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                num_classes=7)
    assert not torch.equal(dropped.eval()(x), expect)
    # ... and the helper that reads the JSON
    m2 = load_exported(path)
    assert torch.equal(m2.eval()(x), expect) and tuple(m2.pretrained_cfg["mean"]) == tuple(mean)
    # timm's own layout: one call, no num_classes or kwargs to remember
    folder = tmp_path / "student"
    m3 = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert m3.num_classes == 7 and torch.equal(m3.eval()(x), expect)
    assert tuple(m3.pretrained_cfg["input_size"]) == (3, 32, 32) and tuple(m3.pretrained_cfg["mean"]) == tuple(mean)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["label_names"] == list("abcdefg")
    assert config["model_args"]["drop_rate"] == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student", "student.json", "student.safetensors"]
    assert torch.equal(load_exported(folder).eval()(x), expect)


BAD = [
    ("optim.lrr=1", "optim.lrr"),
    ("train.epochs=0", "train.epochs"),
    ("train.max_steps=0", "train.max_steps"),
    ("data.batch_size=-1", "data.batch_size"),
    ("deepspeed.zero_stage=5", "deepspeed.zero_stage"),
    ("train.precision=fp8", "train.precision"),
    ("optim.name=lamb", "optim.name"),
    ("schedule.name=poly", "schedule.name"),
    ("schedule.warmup_epochs=-1", "schedule.warmup_epochs"),
    ("schedule.gamma=2", "schedule.gamma"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.log_every=0", "train.log_every"),
    ("train.max_nonfinite=0", "train.max_nonfinite"),
    ("train.grad_clip=-1", "train.grad_clip"),
    ("train.stop_at_step=0", "train.stop_at_step"),
    ("seed=abc", "seed"),
    # found by the trainer, still before the run folder exists
    ("model.teacher=no_such_model", "model.teacher"),
    ("model.student=vit_tiny_patch16_224", "model.student"),
    ("model.teacher_checkpoint=/nonexistent/teacher.pt", "model.teacher_checkpoint"),
    ("deepspeed.config_file=/nonexistent/ds.json", "deepspeed.config_file"),
    ("train.grad_accum=100", "train.grad_accum"),
]


@pytest.mark.parametrize("override,key", BAD, ids=[b[0] for b in BAD])
def test_malformed_config_is_one_line_naming_the_key(tmp_path, capsys, override, key, write_config):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--config", cfg, "--out", str(run), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hcd train: error: ") and key in err, err
    assert not run.exists()


def test_deepspeed_file_with_another_stage_is_rejected(tmp_path, capsys, write_config):
    cfg = write_config(tmp_path)
    (tmp_path / "z3.json").write_text('{"zero_optimization": {"stage": 3}}')
    code = main(["train", "--config", cfg, "--out", str(tmp_path / "run"), "--set",
                 f"deepspeed.config_file={tmp_path / 'z3.json'}", "--set", "deepspeed.zero_stage=2"])
    assert code == 2 and "deepspeed.zero_stage" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["bench", "--n", "abc"], "hcd bench: error: argument --n"),
    (["train"], "hcd train: error: the following arguments are required: --config"),
    (["frob"], "hcd: error: argument COMMAND: invalid choice"),
])
def test_argument_errors_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(needle) and "--help" in err, err


def _readme_snippet() -> str:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index("```python\nimport timm\nmodel = timm.create_model(\"local-dir:") + len("```python\n")
    return text[start:text.index("```", start)]


def test_the_readmes_timm_snippet_scores_what_hcd_eval_prints(tmp_path, capsys):
    """The exported student through timm's standard data path (resolve_data_config + create_transform) as the
    README shows it: the same logits as the run's val loader, so the score `hcd eval` printed."""
    import re

    import numpy as np
    from PIL import Image

    from hcd.engine.config import load_config
    from hcd.engine.data import build_loaders
    rng = np.random.default_rng(0)  # noise images of varied sizes: the preprocessing decides every logit
    for split, n in (("train", 2), ("val", 4)):
        for c in "abc":
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (37 + 5 * i, 44, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "data" / split / c / f"{i}.jpg", quality=95)
    torch.manual_seed(0)
    student = build_student("resnet18", 3, [4])
    mean, std = norm_stats(student.model)
    run = tmp_path / "runs" / "x"
    export_student(student.model.state_dict(), run, "resnet18", 3, mean=mean, std=std, img_size=32, crop_pct=0.8,
                   class_names=list("abc"))
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "student.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # readable like other files
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{student: resnet18, num_classes: 3}}\ndata: {{root: {tmp_path / 'data'}, "
                      "img_size: 32, crop_pct: 0.8, loader: torch, num_workers: 0, batch_size: 2}\n")
    assert main(["eval", "--config", str(config), "--checkpoint", str(run / "student.safetensors")]) == 0
    printed = float(re.search(r"val top-1 ([0-9.]+)%", capsys.readouterr().out).group(1))
    # an export is evaluated as what it is, and the config's other model.student is said to be unused
    assert main(["eval", "--config", str(config), "--checkpoint", str(run / "student.safetensors"),
                 "--set", "model.student=resnet34"]) == 0
    out = capsys.readouterr().out
    assert "model.student (resnet34) is not used" in out and f"val top-1 {printed:.2f}%" in out

    namespace = {}
    exec(_readme_snippet().replace("runs/x", str(run)), namespace)
    model, transform = namespace["model"].eval(), namespace["transform"]
    _, val_loader = build_loaders(load_config(str(config)).data, mean, std)
    ours = torch.cat([model(images) for images, _ in val_loader])
    labels = torch.cat([labels for _, labels in val_loader])
    files = sorted((tmp_path / "data" / "val").rglob("*.jpg"))
    theirs = torch.cat([model(transform(Image.open(f).convert("RGB")).unsqueeze(0)) for f in files])
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert 100.0 * (theirs.argmax(1) == labels).float().mean().item() == pytest.approx(printed, abs=0.005)
